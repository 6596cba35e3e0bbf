"""The layers tuned for speed: the functions of minillm.layers, with the same signatures and numbers.

minillm.layers is the reference, written as the equations read; this package
computes the same things faster, at the price of plainer code: in-place chains,
outputs written through views, row sums as matrix-vector products (rows.py),
causal query blocks in attention, and single-kernel GPU paths (backend.fuse).
Each module's docstring says what it does differently from its reference and
what that buys for the layer alone, measured; the equations live in the reference
docstrings. What each buys in a whole training step: python -m minillm.bench.readings
(README, "Reading the code"). adamw.py is the same for optim.adamw_update.
tests/test_fast.py checks every function here against its reference.

Layers with nothing to tune (embedding, dropout, lora) are the reference modules
themselves, so the two packages are interchangeable:

    import minillm.fast as L        # or: import minillm.layers as L
    out, cache = L.attention.forward(x, w_attn, b_attn, w_proj, b_proj, n_head)
"""

from minillm.fast import attention, cross_entropy, gelu, layernorm, linear, mlp, softmax  # noqa: E402
from minillm.layers import dropout, embedding, lora  # nothing to tune: the reference itself

__all__ = ["attention", "cross_entropy", "dropout", "embedding", "gelu", "layernorm", "linear", "lora", "mlp",
           "softmax"]
