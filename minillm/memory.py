"""The memory a request needs, checked before anything is allocated.

A model, a batch or a cache too large for the machine would otherwise fail deep in
NumPy with a bare MemoryError, or, worse, grow until the system kills the process.
Each size here is a lower bound computed from the shapes alone (no allocation),
and `check_fits` compares it with the machine's physical memory; `check_model_fits`
does so for a model's parameters, before the model draws its initial weights.
"""

import math
from dataclasses import replace

from minillm.errors import ConfigError
from minillm.files import GiB
from minillm.system import physical_memory


def size_text(nbytes):
    gib = nbytes / GiB
    return f"{gib:,.1f} GiB" if gib < 1e6 else f"{gib:.1e} GiB"


def check_fits(nbytes, what, hint):
    """Raise ConfigError when `nbytes` exceed the machine's memory: what needs it, how much, and `hint`."""
    limit = physical_memory()
    if limit is not None and nbytes > limit:
        raise ConfigError(
            f"{what} would need at least {size_text(nbytes)}, more than this machine's "
            f"{size_text(limit)} of memory; {hint}"
        )


def check_model_fits(config, itemsize, parameter_shapes):
    """Raise ConfigError when the parameters of a model of this config alone exceed the machine's memory.

    The model passes its own `parameter_shapes` (config -> {name: shape}): this module sits below the
    model and imports none of it. The count comes from a one- and a two-block model's shapes, so a
    config of absurdly many blocks costs no loop over them.
    """
    count = lambda n_layer: sum(math.prod(s) for s in parameter_shapes(replace(config, n_layer=n_layer)).values())
    one = count(1)
    check_fits(
        (one + (config.n_layer - 1) * (count(2) - one)) * itemsize,
        f"a model of {config.n_layer} blocks of width {config.n_embd}, vocabulary {config.vocab_size}, "
        f"context {config.block_size}" + (f", LoRA rank {config.lora_rank}" if config.lora_rank else ""),
        "choose a smaller model",
    )


def forward_bytes(config, batch_size, length, itemsize):
    """A lower bound on the activations one forward pass keeps for backward: per token and layer,
    about 16 vectors of n_embd and two rows of attention weights; per token, the logits twice."""
    per_token = config.n_layer * (16 * config.n_embd + 2 * config.n_head * length) + 2 * config.vocab_size
    return batch_size * length * per_token * itemsize


def kv_cache_bytes(config, batch_size, itemsize):
    """The keys and values of every layer, for batch_size sequences of the full context."""
    return 2 * config.n_layer * batch_size * config.block_size * config.n_embd * itemsize
