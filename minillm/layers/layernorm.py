"""LayerNorm over the last axis.

Shapes:   x: (..., C)   w: (C,)   b: (C,) or None   out: (..., C)

forward:  mu   = mean(x)                 (over the last axis, per row)
          var  = mean((x - mu)^2)
          rstd = 1 / sqrt(var + eps)
          xhat = (x - mu) * rstd
          out  = w * xhat + b

backward: dw    = sum over rows of dout * xhat
          db    = sum over rows of dout
          dxhat = dout * w
          dx    = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

The dx line is the compact closed form: differentiate xhat through mu and var,
    d xhat_i / d x_j = rstd * (delta_ij - 1/C - xhat_i xhat_j / C),
and contract with dxhat_i over i. (Means over the last axis: layers/rows.py.)

On a GPU the elementwise steps after the means, (x - mu) * rstd * w + b forward
and the dx line backward, each run as one fused kernel (backend.fuse).
"""

from minillm.backend import fuse, fusing
from minillm.layers.rows import row_means

EPS = 1e-5


def forward(x, w, b, eps=EPS):
    centred = x - row_means(x)  # x - mu
    rstd = 1.0 / (row_means(centred * centred) + eps) ** 0.5
    if fusing(x):
        xhat, out = normalize_fused(centred, rstd, w, 0.0 if b is None else b)
    else:
        xhat = centred
        xhat *= rstd  # (x - mu) * rstd, in place
        out = xhat * w
        if b is not None:
            out += b
    return out, (xhat, rstd, w, b is not None)


def backward(dout, cache):
    """Returns (dx, dw, db); db is None when the layer has no bias."""
    xhat, rstd, w, has_bias = cache
    rows = tuple(range(dout.ndim - 1))
    dw = (dout * xhat).sum(axis=rows)
    db = dout.sum(axis=rows) if has_bias else None
    dxhat = dout * w
    mean_dxhat, projection = row_means(dxhat), row_means(dxhat * xhat)
    if fusing(dout):
        return input_grad_fused(dxhat, xhat, rstd, mean_dxhat, projection), dw, db
    dx = dxhat  # turned into dx in place
    dx -= mean_dxhat
    dx -= xhat * projection
    dx *= rstd
    return dx, dw, db


@fuse
def normalize_fused(centred, rstd, w, b):
    """(xhat, out) of forward() from x - mu and rstd, as one kernel on a GPU."""
    xhat = centred * rstd
    return xhat, xhat * w + b


@fuse
def input_grad_fused(dxhat, xhat, rstd, mean_dxhat, projection):
    """dx of backward() from dxhat and its two means, as one kernel on a GPU."""
    return rstd * (dxhat - mean_dxhat - xhat * projection)
