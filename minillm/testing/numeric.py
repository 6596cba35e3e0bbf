"""Numerical gradients: central finite differences, and the error measure they are compared by.

    numeric_i = (8 (f(x + h e_i) - f(x - h e_i)) - (f(x + 2h e_i) - f(x - 2h e_i))) / (12 h)

the fourth-order central difference, one element at a time. Its error is O(h^4)
where the plain (f(x + h) - f(x - h)) / 2h has O(h^2), so h can stay large enough
that float64 rounding (about 1e-16 |f| / h) stays small too: with h = 1e-4 typical
errors are near 1e-10.

Near a point where f bends sharply (a LayerNorm whose input row has almost no
variance, say) the O(h^4) term can still be large. `best_numerical_gradient` then
tries smaller steps, 1e-5 and 1e-6, and keeps the best: an error of the difference
formula shrinks with h, while a wrong analytic gradient stays wrong at every h.

The error measure, per array (one parameter, or one layer input):

    relative_error(analytic, numeric) = max_i |analytic_i - numeric_i| / max_i max(|analytic_i|, |numeric_i|)

i.e. the worst element's error measured against the array's largest gradient. It is
0 for a perfect match, and it does not blow up on elements whose gradient is near 0
(where an element-by-element ratio would divide noise by noise).
"""

import numpy

from minillm import backend

TOLERANCE = 1e-6
STEPS = (1e-4, 1e-5, 1e-6)


def numerical_gradient(f, x, h=STEPS[0]):
    """Fourth-order central-difference gradient of the scalar function f() with respect to the array x.

    x is perturbed in place, one element at a time, and restored afterwards.
    """
    xp = backend.get_array_module(x)
    grad = xp.zeros(x.shape, dtype=numpy.float64)
    flat = x.reshape(-1)  # a view: writing to it perturbs x
    grad_flat = grad.reshape(-1)

    def f_at(i, value):
        flat[i] = value
        return float(f())

    for i in range(flat.size):
        original = flat[i].copy()
        near = f_at(i, original + h) - f_at(i, original - h)
        far = f_at(i, original + 2 * h) - f_at(i, original - 2 * h)
        flat[i] = original
        grad_flat[i] = (8 * near - far) / (12 * h)
    return grad


def relative_error(analytic, numeric):
    """max |a - n| / max(|a|, |n|) over the array (see the module docstring); 0 when both are 0."""
    a = backend.to_host(analytic).astype(numpy.float64)
    n = backend.to_host(numeric).astype(numpy.float64)
    scale = max(numpy.abs(a).max(initial=0.0), numpy.abs(n).max(initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(numpy.abs(a - n).max() / scale)


def best_numerical_gradient(analytic, f, x, tolerance=TOLERANCE):
    """(relative error, numerical gradient) of `analytic` against f()'s gradient w.r.t. x, trying STEPS in turn.

    Returns the first step's result within the tolerance, or the one with the smallest error when none is.
    """
    best = None
    for h in STEPS:
        numeric = numerical_gradient(f, x, h)
        error = relative_error(analytic, numeric)
        if best is None or error < best[0]:
            best = (error, numeric)
        if error <= tolerance:
            break
    return best
