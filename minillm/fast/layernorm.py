"""LayerNorm over the last axis, tuned: the numbers of minillm/layers/layernorm.py, which has the equations.

What it does differently: the row means (mu, var, and the two means of the backward
pass) are matrix-vector products with a vector of ones (fast/rows.py), which BLAS
computes several times faster than NumPy reduces a short last axis; x - mu becomes
xhat in place, and dxhat becomes dx in place, instead of fresh arrays for each step.
On a GPU the elementwise steps after the means, (x - mu) * rstd * w + b forward and
the dx line backward, each run as one fused kernel (backend.fuse).

What it buys in a whole training step: the `without: layernorm` row of `python -m minillm.bench.readings`
(BENCHMARKS.md, "Two readings"); the layer alone: BENCHMARKS.md, "The fast layers one at a time"."""

from minillm.backend import fuse, fusing
from minillm.fast.rows import row_means
from minillm.layers.layernorm import EPS


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
