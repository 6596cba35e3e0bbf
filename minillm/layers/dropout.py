"""Inverted dropout.

Shapes:   x: any   out: same as x

forward:  u    ~ U[0, 1), drawn once per element
          keep = u >= p                  (True with probability 1 - p)
          mask = keep / (1 - p)          (scaling now keeps E[out] = x, so eval needs no rescale)
          out  = x * mask
backward: dx = dout * mask               (the very mask the forward drew: out is linear in x)

With p == 0, or with no generator (evaluation), the layer is the identity: it
returns x itself and the backward pass returns dout itself.
"""


def forward(x, p, rng):
    """`rng` is a backend.RNG on the device of x, or None to switch dropout off."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0 or rng is None:
        return x, None
    u = rng.uniform(x.shape, x.dtype)
    keep = u >= p
    mask = keep.astype(x.dtype) / (1.0 - p)
    out = x * mask
    return out, mask


def backward(dout, cache):
    """Returns dx."""
    mask = cache
    if mask is None:
        return dout
    dx = dout * mask                     # out = x * mask
    return dx
