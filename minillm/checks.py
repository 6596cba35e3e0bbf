"""What the model refuses before it computes anything: a configuration it cannot build, token ids it cannot use.

    check_config(values, name)              a model configuration's values; GPTConfig checks itself with
                                            it, and options.validate the training options that become one,
                                            naming each as its flag
    token_batch(idx, targets, config, xp)   a batch's token ids and targets, checked, on the model's device
    check_context(end, block_size)          positions beyond the context, when decoding with a KV cache

Token ids index the embedding table, and targets the logits: out of range, NumPy would fail
or read another row, and CuPy would silently wrap around.
"""

import math

from minillm import backend
from minillm.errors import ConfigError
from minillm.finetune import LORA_TARGETS
from minillm.layers import cross_entropy, embedding
from minillm.layers.embedding import TokenIdError

SIZES = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def check_config(values, name=str):
    """Raise ConfigError at the first of a model configuration's values that cannot work.

    `values` maps GPTConfig's fields to their values (other keys are ignored); vocab_size
    may be absent, as in the training options, where the data decides it. `name(field)` is
    how the message names a field.
    """
    for field in (field for field in SIZES if field in values):
        value = values[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name(field)} must be a positive integer, got {value!r}")
    if values["n_embd"] % values["n_head"]:
        raise ConfigError(
            f"{name('n_embd')} ({values['n_embd']}) must be divisible by {name('n_head')} ({values['n_head']})"
        )
    rank = values["lora_rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"{name('lora_rank')} must be 0 (no adapters) or a positive integer, got {rank!r}")
    for field in ("dropout", "lora_alpha"):
        if isinstance(values[field], bool) or not isinstance(values[field], (int, float)):
            raise ConfigError(f"{name(field)} must be a number, got {values[field]!r}")
    if not isinstance(values["bias"], bool):
        raise ConfigError(f"{name('bias')} must be true or false, got {values['bias']!r}")
    targets = values["lora_targets"]
    if not isinstance(targets, str):
        raise ConfigError(f"{name('lora_targets')} must be a string such as 'attn', got {targets!r}")
    parts = targets.split(",")
    if any(part not in LORA_TARGETS for part in parts) or len(set(parts)) < len(parts):
        raise ConfigError(
            f"{name('lora_targets')} must be {' or '.join(LORA_TARGETS)} or both, comma-separated, got {targets!r}"
        )
    # Written so that NaN fails them too.
    if not 0.0 <= values["dropout"] < 1.0:
        raise ConfigError(f"{name('dropout')} must be in [0, 1), got {values['dropout']!r}")
    if not 0 < values["lora_alpha"] < math.inf:
        raise ConfigError(f"{name('lora_alpha')} must be positive and finite, got {values['lora_alpha']!r}")


def token_batch(idx, targets, config, xp):
    """idx and targets (or None), checked against the config, then as arrays of `xp`, on the model's device.

    The checks come before the copy: a batch from the data arrives on the host, where checking
    costs nothing. Ids already on a GPU are checked there, and reading the verdict waits for the
    GPU to finish its queued work.
    """
    idx = backend.get_array_module(idx).asarray(idx)
    embedding.check_token_ids(idx, config.vocab_size, config.block_size)
    if targets is None:
        return xp.asarray(idx), None
    targets = backend.get_array_module(targets).asarray(targets)
    if targets.shape != idx.shape:
        raise TokenIdError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
    outside = (targets != cross_entropy.IGNORE_INDEX) & ((targets < 0) | (targets >= config.vocab_size))
    if bool(outside.any()):
        raise TokenIdError(
            f"targets must lie in [0, {config.vocab_size}) or be IGNORE_INDEX ({cross_entropy.IGNORE_INDEX}), "
            f"got {int(targets[outside][0])}"
        )
    return xp.asarray(idx), xp.asarray(targets)


def check_context(end, block_size):
    """Raise TokenIdError when positions up to `end` do not fit the model's context."""
    if end > block_size:
        raise TokenIdError(f"positions up to {end} do not fit the model's block_size {block_size}")
