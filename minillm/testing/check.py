"""check_layer: a layer's hand-written backward pass against central finite differences, in float64.

The objective is L = sum(out * dout) with a fixed random dout (a 0-d one when out is a
scalar, such as a loss), so backward(dout, cache) should return exactly dL/dinput for
each input, and each of those is compared with the numerical gradient of L.
"""

import inspect

import numpy

from minillm import backend
from minillm.testing.numeric import TOLERANCE, best_numerical_gradient, numerical_gradient
from minillm.testing.report import GradientReport, Row, compare_row

DOUT_STREAM = 1


def check_layer(forward, backward, inputs, *, kwargs=None, seed=0, tolerance=TOLERANCE, names=None):
    """Check backward's gradients of every input of forward; returns a GradientReport (print it, or .assert_ok()).

    forward(*inputs, **kwargs) -> (out, cache) and backward(dout, cache) -> the gradients in the order of
    the inputs: the contract of minillm's layers. backward may leave out the inputs that are not
    differentiated (integer arrays such as token ids, and numbers), or return None in their place; None for
    a float array says it is not differentiable, which passes only where the output indeed does not depend
    on it. Keyword arguments (n_head, eps, ...) are passed as they are and not differentiated.

    Inputs are copied to float64 (float32 has too few digits for a finite difference: its rounding alone is
    ~1e-7 |L| / h); the copies stay on the inputs' device, NumPy or CuPy, and the user's arrays are never
    touched. A layer that draws random numbers (dropout) must draw the same ones in every evaluation: each
    keyword argument that is a minillm.backend.RNG is replaced by a fresh one of its class and seed, and
    NumPy's global generator is seeded with `seed`, before every call of forward.

    names: the inputs' names in the report (default: forward's parameter names).
    """
    kwargs = dict(kwargs or {})
    names = list(names or parameter_names(forward, len(inputs)))
    if len(names) != len(inputs):
        raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    given = {str(a.dtype) for a in inputs if is_float_array(a) and a.dtype != numpy.float64}
    inputs = [a.astype(numpy.float64) if is_float_array(a) else a for a in inputs]

    def run():
        numpy.random.seed(seed)
        fresh = {key: type(value)(value.seed, value.device) if isinstance(value, backend.RNG) else value
                 for key, value in kwargs.items()}
        return forward(*inputs, **fresh)

    result = run()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{function_name(forward)} must return (out, cache), got {type(result).__name__}"
                        + (f" of length {len(result)}" if isinstance(result, tuple) else ""))
    out, cache = result
    xp = backend.get_array_module(out)
    # A stream of its own: inputs drawn with default_rng(seed) must not equal dout (x^T dout would be symmetric).
    dout = xp.asarray(numpy.random.default_rng([DOUT_STREAM, seed]).normal(size=numpy.shape(out)))
    grads = backward(dout, cache)

    def objective():
        return (run()[0] * dout).sum()

    title = f"check_layer({function_name(forward)}): float64, dout ~ N(0, 1) (seed {seed}), tolerance {tolerance:g}"
    report = GradientReport(title, [], tolerance)
    if given:
        report.notes.append(f"inputs given as {', '.join(sorted(given))} were checked as float64 copies: "
                            "finite differences need float64's digits")
    grads, problem = align(grads, inputs, names)
    if problem:
        report.problems.append(problem)
        return report
    for name, x, g in zip(names, inputs, grads):
        report.rows.append(input_row(name, x, g, objective, tolerance))
    return report


def compare(got, expected, *, tolerance=TOLERANCE, title="compare"):
    """A GradientReport of arrays against the reference implementation's: {name: array} each, same names."""
    rows = [compare_row(name, got.get(name), expected[name], tolerance, label="expected") for name in expected]
    return GradientReport(title, rows, tolerance, reference="expected")


def function_name(function):
    """'minillm.layers.gelu.forward' for a module's function, the qualified name for others."""
    qualname = getattr(function, "__qualname__", "forward")
    module = getattr(function, "__module__", None)
    return f"{module}.{qualname}" if module and "<locals>" not in qualname else qualname


def is_float_array(a):
    return hasattr(a, "dtype") and hasattr(a, "shape") and a.dtype.kind == "f"


def parameter_names(forward, count):
    """The first `count` positional parameter names of forward, or input0, input1, ... where it has none."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[:count] if len(positional) >= count else [f"input{i}" for i in range(count)]


def align(grads, inputs, names):
    """(backward's gradients, one per input, None where there is none; or a problem line when they do not fit)."""
    grads = list(grads) if isinstance(grads, (tuple, list)) else [grads]
    if len(grads) == len(inputs):
        return grads, None
    differentiable = [i for i, x in enumerate(inputs) if is_float_array(x)]
    if len(grads) == len(differentiable):
        spread = [None] * len(inputs)
        for i, g in zip(differentiable, grads):
            spread[i] = g
        return spread, None
    wanted = ", ".join(names[i] for i in differentiable)
    return None, (f"backward returned {len(grads)} gradient(s), but there are {len(inputs)} inputs "
                  f"({', '.join(names)}), {len(differentiable)} of them differentiable ({wanted}): "
                  "return one gradient per input, in their order")


def input_row(name, x, g, objective, tolerance):
    """The Row of one input: skipped when it is not a float array, else analytic against numerical."""
    if x is None:
        if g is None:
            return Row(name, None, "skipped", detail=["None: absent"])
        return Row(name, None, "WRONG", detail=[f"{name} is None (absent), but backward returns a gradient for it"])
    if not is_float_array(x):
        kind = "an integer array" if hasattr(x, "dtype") else f"a {type(x).__name__}"
        return Row(name, tuple(getattr(x, "shape", ())), "skipped", detail=[f"{kind}: not differentiated"])
    if g is None or getattr(g, "shape", None) != x.shape:
        return compare_row(name, g, numerical_gradient(objective, x), tolerance)
    error, numeric = best_numerical_gradient(g, objective, x, tolerance)
    return compare_row(name, g, numeric, tolerance, error)
