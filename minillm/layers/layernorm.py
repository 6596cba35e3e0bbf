"""LayerNorm over the last axis.

Shapes:   x: (..., C)   w: (C,)   b: (C,) or None   out: (..., C)
          mu, var, rstd: (..., 1), one per row of C features

forward:  mu   = mean(x)                 (over the last axis, per row)
          var  = mean((x - mu)^2)
          rstd = 1 / sqrt(var + eps)
          xhat = (x - mu) * rstd
          out  = xhat * w + b

backward: dw    = sum over rows of dout * xhat
          db    = sum over rows of dout
          dxhat = dout * w
          dx    = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

Derivation of dx, for one row (i, j index its C features):
          d mu / d x_j    = 1/C
          d var / d x_j   = 2/C * (x_j - mu)              (the mu terms sum to zero: sum_i (x_i - mu) = 0)
          d rstd / d x_j  = -1/2 (var + eps)^(-3/2) * d var / d x_j = -rstd^2 * xhat_j / C
          d xhat_i / d x_j = rstd * (delta_ij - 1/C) + (x_i - mu) * d rstd / d x_j
                          = rstd * (delta_ij - 1/C - xhat_i xhat_j / C)
          dx_j = sum_i dxhat_i * d xhat_i / d x_j
               = rstd * (dxhat_j - mean(dxhat) - xhat_j * mean(dxhat * xhat))
The middle term is the path through mu, the last the path through var.
"""

from minillm.backend import get_array_module

EPS = 1e-5


def forward(x, w, b, eps=EPS):
    xp = get_array_module(x)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = (x - mu) * rstd
    out = xhat * w
    if b is not None:
        out = out + b
    return out, (xhat, rstd, w, b is not None)


def backward(dout, cache):
    """Returns (dx, dw, db); db is None when the layer has no bias."""
    xhat, rstd, w, has_bias = cache
    rows = tuple(range(dout.ndim - 1))  # every axis but the features
    dw = (dout * xhat).sum(axis=rows)                       # out = xhat * w + b
    db = dout.sum(axis=rows) if has_bias else None          # out = xhat * w + b
    dxhat = dout * w                                        # out = xhat * w + b
    dx = rstd * (dxhat                                      # xhat = (x - mu) * rstd, directly,
                 - dxhat.mean(axis=-1, keepdims=True)       # through mu,
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # and through var (in rstd)
    return dx, dw, db
