"""Softmax over the last axis.

Shapes:   s: (..., N)   p: same as s

forward:  p_i = exp(s_i - m) / sum_j exp(s_j - m)      with m = max_j s_j
          (subtracting m changes nothing mathematically and keeps exp from
          overflowing; entries equal to -inf get probability exactly 0)

backward: dp_i/ds_j = p_i (delta_ij - p_j), so
          ds = p * (dp - sum(dp * p))                  (sum over the last axis)
"""

from minillm.backend import get_array_module
from minillm.layers.rows import row_sums


def forward(s):
    xp = get_array_module(s)
    p = s - s.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p /= row_sums(p)
    return p, p


def backward(dp, cache):
    """Returns ds."""
    p = cache
    return p * (dp - row_sums(dp * p))
