"""Softmax over the last axis.

Shapes:   s: (..., N)   p: same as s

forward:  m   = max_j s_j                (per row)
          e_i = exp(s_i - m)
          p_i = e_i / sum_j e_j
          Subtracting m changes nothing mathematically (it cancels in the ratio) and
          keeps exp from overflowing; entries equal to -inf get probability exactly 0.

backward: dp_i / ds_j = p_i (delta_ij - p_j), so
          ds_j = sum_i dp_i p_i (delta_ij - p_j) = p_j (dp_j - sum_i dp_i p_i)
          ds   = p * (dp - sum(dp * p))                  (sum over the last axis)
          m needs no gradient: p does not depend on it.
"""

from minillm.backend import get_array_module


def forward(s):
    xp = get_array_module(s)
    m = s.max(axis=-1, keepdims=True)
    e = xp.exp(s - m)
    p = e / e.sum(axis=-1, keepdims=True)
    return p, p


def backward(dp, cache):
    """Returns ds."""
    p = cache
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))        # p = e / sum(e), e = exp(s - m)
    return ds
