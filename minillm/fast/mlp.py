"""The transformer's feed-forward block, tuned: the numbers of minillm/layers/mlp.py, which has the equations.

What it does differently: nothing of its own. It is the reference's composition,
linear, GELU, linear, over the fast linear layer (fast/linear.py: 2-D products, bias
in place) and the fast GELU (fast/gelu.py: in place, one kernel on a GPU).

The layer alone against the reference: BENCHMARKS.md, "The fast layers one at a time"."""

from minillm.fast import gelu, linear


def forward(x, w_fc, b_fc, w_proj, b_proj):
    h, fc_cache = linear.forward(x, w_fc, b_fc)
    g, gelu_cache = gelu.forward(h)
    out, proj_cache = linear.forward(g, w_proj, b_proj)
    return out, (fc_cache, gelu_cache, proj_cache)


def backward(dout, cache, weight_grads=True):
    """Returns (dx, dw_fc, db_fc, dw_proj, db_proj)."""
    fc_cache, gelu_cache, proj_cache = cache
    dg, dw_proj, db_proj = linear.backward(dout, proj_cache, weight_grads)
    dh = gelu.backward(dg, gelu_cache)
    dx, dw_fc, db_fc = linear.backward(dh, fc_cache, weight_grads)
    return dx, dw_fc, db_fc, dw_proj, db_proj
