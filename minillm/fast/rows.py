"""Sums and means over the last axis, as matrix-vector products.

    row_sums(a)  = a @ (1, 1, ..., 1)     (..., N) -> (..., 1)
    row_means(a) = row_sums(a) / N

The same numbers as a.sum(axis=-1, keepdims=True) up to rounding, computed by
BLAS several times faster than NumPy reduces a short last axis, such as
LayerNorm's rows of C values and the attention softmax's rows of T (fast/layernorm.py,
fast/softmax.py; the reference layers use a.sum and a.mean).
The result keeps a last axis of 1, so it broadcasts against a.
"""

from minillm.backend import get_array_module


def row_sums(a):
    xp = get_array_module(a)
    return (a @ xp.ones(a.shape[-1], dtype=a.dtype))[..., None]


def row_means(a):
    return row_sums(a) / a.shape[-1]
