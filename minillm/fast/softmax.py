"""Softmax over the last axis, tuned: the numbers of minillm/layers/softmax.py, which has the equations.

What it does differently: the row sums (of exp, and of dp * p backward) are
matrix-vector products with a vector of ones (fast/rows.py), faster than NumPy's
reduction over a short last axis; exp(s - m) and the division by the row sum work in
place in one buffer. On a GPU, exp(s - m) forward and the ds line backward each run
as one fused kernel (backend.fuse).

What it buys in a whole training step: the `without: softmax` row of `python -m minillm.bench.readings`
(BENCHMARKS.md, "Two readings"); the layer alone: BENCHMARKS.md, "The fast layers one at a time"."""

from minillm.backend import fuse, fusing, get_array_module
from minillm.fast.rows import row_sums


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
