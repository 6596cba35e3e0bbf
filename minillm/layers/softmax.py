"""Softmax over the last axis.

Shapes:   s: (..., N)   p: same as s

forward:  p_i = exp(s_i - m) / sum_j exp(s_j - m)      with m = max_j s_j
          (subtracting m changes nothing mathematically and keeps exp from
          overflowing; entries equal to -inf get probability exactly 0)

backward: dp_i/ds_j = p_i (delta_ij - p_j), so
          ds = p * (dp - sum(dp * p))                  (sum over the last axis)

On a GPU, exp(s - m) forward and the ds line backward each run as one fused
kernel (backend.fuse).
"""

from minillm.backend import fuse, fusing, get_array_module
from minillm.layers.rows import row_sums


def forward(s):
    row_max = s.max(axis=-1, keepdims=True)
    if fusing(s):
        p = exp_shifted_fused(s, row_max)
    else:
        p = s - row_max
        get_array_module(s).exp(p, out=p)
    p /= row_sums(p)
    return p, p


def backward(dp, cache):
    """Returns ds."""
    p = cache
    row_sum = row_sums(dp * p)
    if fusing(dp):
        return input_grad_fused(p, dp, row_sum)
    return p * (dp - row_sum)


@fuse
def exp_shifted_fused(s, row_max):
    """exp(s - m) of forward(), as one kernel on a GPU."""
    return get_array_module(s).exp(s - row_max)


@fuse
def input_grad_fused(p, dp, row_sum):
    """ds of backward() from sum(dp * p), as one kernel on a GPU."""
    return p * (dp - row_sum)
