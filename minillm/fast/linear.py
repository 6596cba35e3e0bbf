"""Linear (affine) layer, tuned: the numbers of minillm/layers/linear.py, which has the equations.

What it does differently: the forward multiplies x flattened to one (N, n_in) matrix,
one large 2-D product, where the reference's x @ w on (B, T, n_in) lets NumPy loop over
the batch with a product per sample; the bias is added in place, into the product's
own buffer, instead of into a fresh array. The backward forms dx from the flattened
rows too.

What it buys in a whole training step: the `without: linear` row of `python -m minillm.bench.readings`
(BENCHMARKS.md, "Two readings"); the layer alone: BENCHMARKS.md, "The fast layers one at a time"."""


def forward(x, w, b=None):
    n_in, n_out = w.shape
    # One large 2-D matrix product over all rows is faster than a batched one.
    out = x.reshape(-1, n_in) @ w
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], n_out), (x, w, b is not None)


def backward(dout, cache, weight_grads=True):
    """Returns (dx, dw, db); db is None when the layer has no bias, dw and db when not weight_grads."""
    x, w, has_bias = cache
    n_in, n_out = w.shape
    dout_rows = dout.reshape(-1, n_out)
    dx = (dout_rows @ w.T).reshape(x.shape)
    if not weight_grads:
        return dx, None, None
    dw = x.reshape(-1, n_in).T @ dout_rows
    db = dout_rows.sum(axis=0) if has_bias else None
    return dx, dw, db
