"""The transformer's feed-forward block: expand 4x, GELU, project back.

Shapes:   x: (B, T, C)   w_fc: (C, 4C)   b_fc: (4C,)   w_proj: (4C, C)   b_proj: (C,)
          out: (B, T, C)

forward:  h   = x @ w_fc + b_fc           (linear)
          g   = gelu(h)
          out = g @ w_proj + b_proj       (linear)

backward: the chain rule through the same three steps, in reverse:
          dg, dw_proj, db_proj = linear.backward(dout)
          dh                   = gelu.backward(dg)
          dx, dw_fc, db_fc     = linear.backward(dh)
          weight_grads=False (frozen weights) skips dw and db: only dx is returned non-None.
"""

from minillm.layers import gelu, linear


def forward(x, w_fc, b_fc, w_proj, b_proj):
    h, fc_cache = linear.forward(x, w_fc, b_fc)
    g, gelu_cache = gelu.forward(h)
    out, proj_cache = linear.forward(g, w_proj, b_proj)
    return out, (fc_cache, gelu_cache, proj_cache)


def backward(dout, cache, weight_grads=True):
    """Returns (dx, dw_fc, db_fc, dw_proj, db_proj)."""
    fc_cache, gelu_cache, proj_cache = cache
    dg, dw_proj, db_proj = linear.backward(dout, proj_cache, weight_grads)   # out = g @ w_proj + b_proj
    dh = gelu.backward(dg, gelu_cache)                                      # g = gelu(h)
    dx, dw_fc, db_fc = linear.backward(dh, fc_cache, weight_grads)           # h = x @ w_fc + b_fc
    return dx, dw_fc, db_fc, dw_proj, db_proj
