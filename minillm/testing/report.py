"""What a gradient check found: one row per input, a verdict each, and for a wrong one what it looks like.

Verdicts:
    exact      the analytic gradient equals the numerical one to the last bit
    ok         their relative error is within the tolerance
    WRONG      it is not, or the gradient is missing, NaN or of the wrong shape
    unchecked  both are zero: nothing was tested, and that fails too
    skipped    not differentiated: integer ids, an absent (None) input, a number, or an input that backward
               marks as not differentiable (None) and that the output indeed does not depend on

A WRONG row names its worst element, and says what the difference looks like when it is one of the
mistakes a hand-written backward pass often makes: a constant factor (2x, 1/2, a flipped sign, a mean
taken where a sum belongs), the transpose of the right answer, a gradient right up to a missing sum
over the axes along which the input was broadcast (a bias used by every row), or zero where it should
not be (a path left out).
"""

from dataclasses import dataclass, field
from fractions import Fraction

import numpy

from minillm import backend
from minillm.testing.numeric import relative_error

PASSING = ("exact", "ok", "skipped")


@dataclass
class Row:
    """One input's result. `max_abs` and `rel_error` are None where there was nothing to compare."""

    name: str
    shape: tuple | None  # None for an absent input
    verdict: str
    max_abs: float | None = None
    rel_error: float | None = None
    detail: list = field(default_factory=list)

    @property
    def ok(self):
        return self.verdict in PASSING


@dataclass
class GradientReport:
    """The rows of a check, printable as a table; `problems` are failures that belong to no one input."""

    title: str
    rows: list
    tolerance: float
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    reference: str = "numeric"
    heading: str = "input"  # what a row is: a layer's input, or a model's parameter

    @property
    def ok(self):
        return not self.problems and all(row.ok for row in self.rows)

    @property
    def failing(self):
        return [row for row in self.rows if not row.ok]

    def assert_ok(self):
        """Raise AssertionError, with the whole table as its message, unless every gradient passed."""
        if not self.ok:
            raise AssertionError("\n" + str(self))

    def __str__(self):
        number = lambda value: "-" if value is None else "0" if value == 0 else f"{value:.2e}"
        shape = lambda row: "-" if row.shape is None else "x".join(map(str, row.shape)) or "scalar"
        table = [(self.heading, "shape", "max abs diff", "rel error", "verdict")] + [
            (row.name, shape(row), number(row.max_abs), number(row.rel_error), row.verdict) for row in self.rows
        ]
        widths = [max(len(line[i]) for line in table) for i in range(5)]
        lines = [self.title] + [f"  {note}" for note in self.notes]
        for i, line in enumerate(table):
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
            lines += [f"    {text}" for text in (self.rows[i - 1].detail if i else [])]
        lines += self.problems
        if self.ok:
            what = "gradient" if self.reference == "numeric" else "array"
            lines.append(f"passed: every {what} within {self.tolerance:g} of the {self.reference} one")
        elif self.problems:
            lines.append("FAILED: the gradients could not be compared")
        else:
            wrong = [row.name for row in self.failing]
            lines.append(f"FAILED: {len(wrong)} of {len(self.rows)} wrong ({', '.join(wrong)})")
        return "\n".join(lines)


def compare_row(name, analytic, reference, tolerance, error=None, label="numeric"):
    """The Row of an analytic gradient against the reference one (numerical, or another implementation's).

    `error` is the relative error when the caller has it already (from best_numerical_gradient).
    """
    n = backend.to_host(reference).astype(numpy.float64)
    if analytic is None:
        if not n.any():
            return Row(name, n.shape, "skipped", detail=["backward returns None (not differentiable), "
                                                         "and the output indeed does not depend on it"])
        return Row(name, n.shape, "WRONG", detail=[f"backward returns None, but the output depends on {name}"])
    if not hasattr(analytic, "shape"):
        return Row(name, n.shape, "WRONG", detail=[f"backward returns {type(analytic).__name__}, not an array"])
    a = backend.to_host(analytic).astype(numpy.float64)
    if a.shape != n.shape:
        return Row(name, a.shape, "WRONG", detail=[f"shape {shape_text(a.shape)}, but {name} has shape "
                                                   f"{shape_text(n.shape)}"] + shape_diagnosis(a, n, tolerance))
    error = relative_error(a, n) if error is None else error
    max_abs = float(numpy.abs(a - n).max(initial=0.0))
    if not numpy.isfinite(a).all():
        return Row(name, a.shape, "WRONG", max_abs, error, [f"the analytic gradient has {non_finite(a)}"])
    if not a.any() and not n.any():
        return Row(name, a.shape, "unchecked", 0.0, 0.0,
                   [f"both gradients are zero: nothing was tested (the output does not depend on {name} here)"])
    if max_abs == 0.0:
        return Row(name, a.shape, "exact", 0.0, 0.0)
    if error <= tolerance:
        return Row(name, a.shape, "ok", max_abs, error)
    worst = numpy.unravel_index(numpy.abs(a - n).argmax(), a.shape)
    detail = [f"worst element {list(map(int, worst))}: analytic {a[worst]:.6g}, {label} {n[worst]:.6g}"]
    return Row(name, a.shape, "WRONG", max_abs, error, detail + value_diagnosis(a, n, tolerance, label))


def shape_text(shape):
    return "x".join(map(str, shape)) or "() (a scalar)"


def non_finite(a):
    return "NaN" if numpy.isnan(a).any() else "an infinity"


def close(a, n, tolerance):
    return a.shape == n.shape and relative_error(a, n) <= tolerance


def value_diagnosis(a, n, tolerance, label):
    """What a same-shaped wrong gradient looks like, when it is one of the recognisable mistakes."""
    if not a.any():
        return [f"it is zero where the {label} one is not" + (": the path from the output to this input is missing"
                                                               if label == "numeric" else "")]
    if not n.any():
        return [f"the {label} one is zero" + (": the output does not depend on this input, so neither should the "
                                              "gradient" if label == "numeric" else "")]
    if a.ndim >= 2 and close(a.swapaxes(-1, -2), n, tolerance):
        return ["it is the transpose of the right answer (the last two axes swapped)"]
    factor = float((a * n).sum() / (n * n).sum())
    # With one non-zero element every wrong value is "a factor" of the right one: only a simple one
    # (2, 1/2, -1) then says something.
    if close(a, factor * n, tolerance) and (numpy.count_nonzero(n) >= 2 or simple_fraction(factor)):
        return [f"it is {factor_text(factor)}: a constant factor is wrong"]
    zero_here = (a == 0) & (n != 0)
    if zero_here.any() and close(numpy.where(zero_here, 0.0, a), numpy.where(zero_here, 0.0, n), tolerance):
        return [f"it is right except for {int(zero_here.sum())} element(s) that are zero where they should not be"]
    return []


def factor_text(factor):
    """2.0 -> '2x the right answer', 0.5 -> '1/2 of the right answer', -1.0 -> '-1x the right answer (the sign
    flipped)'; a factor that is no simple fraction as a number."""
    simple = simple_fraction(factor)
    if simple is None:
        text = f"{factor:.6g}x the right answer"
    elif simple.denominator == 1:
        text = f"{simple.numerator}x the right answer"
    else:
        text = f"{simple} of the right answer"
    return text + (" (the sign flipped)" if factor < 0 else "")


def simple_fraction(factor):
    """The fraction p/q (q <= 64) that factor is, to 1e-6 relative, or None."""
    simple = Fraction(factor).limit_denominator(64)
    return simple if abs(float(simple) - factor) <= 1e-6 * abs(factor) else None


def shape_diagnosis(a, n, tolerance):
    """What a wrongly shaped gradient is, when it is the transpose or a missing sum over broadcast axes."""
    if a.ndim == n.ndim >= 2 and a.shape == n.swapaxes(-1, -2).shape and close(a.swapaxes(-1, -2), n, tolerance):
        return ["it is the transpose of the right answer (the last two axes swapped)"]
    if a.ndim >= n.ndim:
        lead = a.ndim - n.ndim
        broadcast = tuple(i for i, size in enumerate(n.shape) if size == 1)
        summed = a.sum(axis=tuple(range(lead))).sum(axis=broadcast, keepdims=True)
        if summed.shape == n.shape and close(summed, n, tolerance):
            axes = tuple(range(lead)) + tuple(lead + i for i in broadcast)
            return [f"summed over axes {axes} it is right: the input is used at every one of those positions, "
                    "so its gradient adds up over them"]
    return []
