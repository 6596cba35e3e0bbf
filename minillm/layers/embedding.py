"""Token embedding plus learned position embedding.

Shapes:   idx: (B, T) integer token ids   wte: (V, C)   wpe: (block_size, C)   out: (B, T, C)

forward:  out[b, t] = wte[idx[b, t]] + wpe[t]

backward: dwte[v] = sum of dout[b, t] over every (b, t) with idx[b, t] == v
          dwpe[t] = sum over b of dout[b, t]          (rows t >= T get zero)
          The dwte sum is a scatter-add: a token repeated in the batch adds
          its gradient once per occurrence, so plain `dwte[idx] += dout` would
          be wrong (it keeps only one of the repeats).

forward does not check idx: out of range, NumPy would fail or read another row,
and CuPy would silently wrap around. Callers check once with check_token_ids,
on the host where they can (the model does, before copying a batch to the device).
"""

from minillm.backend import get_array_module


class TokenIdError(ValueError):
    """Token ids outside [0, vocab_size), or sequences longer than the context."""


def check_token_ids(idx, vocab_size, block_size):
    """Raise TokenIdError unless idx is (B, T) integer ids in [0, vocab_size) with T <= block_size."""
    if idx.ndim != 2:
        raise TokenIdError(f"token ids must have shape (batch, time), got shape {tuple(idx.shape)}")
    if idx.dtype.kind not in "iu":
        raise TokenIdError(f"token ids must be integers, got dtype {idx.dtype}")
    if idx.shape[1] > block_size:
        raise TokenIdError(
            f"sequence length {idx.shape[1]} exceeds the model's block_size {block_size}"
        )
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise TokenIdError(
            f"token ids must lie in [0, {vocab_size}), got range "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )


def forward(idx, wte, wpe):
    T = idx.shape[1]
    out = wte[idx] + wpe[:T]
    return out, (idx, wte.shape, wpe.shape)


def backward(dout, cache):
    """Returns (dwte, dwpe); the token ids themselves have no gradient."""
    idx, wte_shape, wpe_shape = cache
    xp = get_array_module(dout)
    C = dout.shape[-1]
    dwte = xp.zeros(wte_shape, dtype=dout.dtype)
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))   # out[b, t] = wte[idx[b, t]] + ..., repeats add up
    dwpe = xp.zeros(wpe_shape, dtype=dout.dtype)
    dwpe[: idx.shape[1]] = dout.sum(axis=0)                  # out[b, t] = ... + wpe[t], for every b
    return dwte, dwpe
