"""Linear (affine) layer.

Shapes:   x: (..., n_in)   w: (n_in, n_out)   b: (n_out,) or None   out: (..., n_out)
          w is stored input-by-output, the layout of GPT-2's Conv1D weights.

forward:  out = x @ w + b

backward: one row r of x (any position of any batch) gives one row of out:
              out_rj = sum_i x_ri w_ij + b_j
          so, with G = dout:
          dx_ri = sum_j G_rj w_ij             dx = G @ w^T
          dw_ij = sum_r x_ri G_rj             dw = X^T @ G   (X, G: the rows flattened to (N, n_in), (N, n_out))
          db_j  = sum_r G_rj                  db = sum over rows of G
          w and b are used by every row, so their gradients add up over all N rows.
          With weight_grads=False (a frozen layer) only dx is computed: dw and db
          are returned as None, since nothing would use them.
"""


def forward(x, w, b=None):
    out = x @ w
    if b is not None:
        out = out + b
    return out, (x, w, b is not None)


def backward(dout, cache, weight_grads=True):
    """Returns (dx, dw, db); db is None when the layer has no bias, dw and db when not weight_grads."""
    x, w, has_bias = cache
    n_in, n_out = w.shape
    dx = dout @ w.T                                                   # out = x @ w + b
    if not weight_grads:
        return dx, None, None
    dw = x.reshape(-1, n_in).T @ dout.reshape(-1, n_out)              # out = x @ w + b, every row uses w
    db = dout.reshape(-1, n_out).sum(axis=0) if has_bias else None    # out = x @ w + b, every row uses b
    return dx, dw, db
