"""The reference layers: paired forward and backward functions, one module each, written as the equations read.

Every module has
    forward(inputs..., params...)  -> (out, cache)
    backward(dout, cache)          -> gradients in the order of the differentiable inputs
and a docstring giving the shapes, the equations of both passes and how the
backward equations follow from the forward ones. Each line of a backward pass
says in a comment which forward line it differentiates. Nothing here is written
for speed: every step is a fresh array, exactly as in the equations, and the same
lines run on NumPy and on CuPy (the array module comes from the inputs).

minillm/fast holds the same functions with the same signatures, tuned for speed
(work done in place, causal query blocks in attention, single-kernel GPU paths).
The tests check that each of them gives this package's numbers; read this one
to learn what a layer computes, and that one to see what the speed costs in code.

    import minillm.layers as L
    out, cache = L.layernorm.forward(x, w, b)
"""

from minillm.layers import attention, cross_entropy, dropout, embedding, gelu, layernorm, linear, lora, mlp, softmax

__all__ = ["attention", "cross_entropy", "dropout", "embedding", "gelu", "layernorm", "linear", "lora", "mlp",
           "softmax"]
