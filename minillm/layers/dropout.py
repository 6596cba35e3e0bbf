"""Inverted dropout.

Shapes:   x: any   out: same as x

forward:  keep ~ Bernoulli(1 - p), drawn once per element
          mask = keep / (1 - p)          (scaling now keeps E[out] = x, so eval needs no rescale)
          out  = x * mask
backward: dx = dout * mask               (the very mask the forward drew)

With p == 0, or with no generator (evaluation), the layer is the identity.
"""


def forward(x, p, rng):
    """`rng` is a backend.RNG on the device of x, or None to switch dropout off."""
    if p == 0.0 or rng is None:
        return x, None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    keep = rng.uniform(x.shape, x.dtype) >= p
    mask = keep.astype(x.dtype)
    mask *= 1.0 / (1.0 - p)
    return x * mask, mask


def backward(dout, cache):
    """Returns dx."""
    mask = cache
    return dout if mask is None else dout * mask
