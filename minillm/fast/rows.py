"""Sums and means over the last axis, as matrix-vector products.

    row_sums(a)  = a @ (1, 1, ..., 1)     (..., N) -> (..., 1)
    row_means(a) = row_sums(a) / N

The same numbers as a.sum(axis=-1, keepdims=True) up to rounding, computed by
BLAS several times faster than NumPy reduces a short last axis, such as
LayerNorm's rows of C values and the attention softmax's rows of T (fast/layernorm.py,
fast/softmax.py; the reference layers use a.sum and a.mean).
The result keeps a last axis of 1, so it broadcasts against a.
"""

import functools

from minillm.backend import get_array_module


@functools.lru_cache(maxsize=32)
def ones(n, dtype, xp):
    """A vector of n ones. Built once per length and shared (callers only read it): a fresh one
    each call costs more than the product itself for a decoding step's single row."""
    return xp.ones(n, dtype=dtype)


def row_sums(a):
    return (a @ ones(a.shape[-1], a.dtype, get_array_module(a)))[..., None]


def row_means(a):
    return row_sums(a) / a.shape[-1]
