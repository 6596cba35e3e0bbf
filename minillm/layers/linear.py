"""Linear (affine) layer.

Shapes:   x: (..., n_in)   w: (n_in, n_out)   b: (n_out,) or None   out: (..., n_out)
          w is stored input-by-output, the layout of GPT-2's Conv1D weights.

forward:  out = x @ w + b

backward: with X the rows of x flattened to (N, n_in) and G = dout as (N, n_out),
          dx = G @ w^T                    (each out_j = sum_i x_i w_ij, so d/dx_i = sum_j G_j w_ij)
          dw = X^T @ G                    (sum over all N rows that used w)
          db = sum over rows of G
          With weight_grads=False (a frozen layer) only dx is computed: dw is the
          costliest of the three products, and nothing would use it.
"""


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
