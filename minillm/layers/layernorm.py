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
"""

from minillm.layers.rows import row_means

EPS = 1e-5


def forward(x, w, b, eps=EPS):
    xhat = x - row_means(x)  # x - mu
    var = row_means(xhat * xhat)
    rstd = 1.0 / (var + eps) ** 0.5
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
    dx = dout * w  # dxhat, turned into dx in place below
    projection = row_means(dx * xhat)
    dx -= row_means(dx)
    dx -= xhat * projection
    dx *= rstd
    return dx, dw, db
