"""Check the gradients of your own layers: the checker minillm's own tests and commands use.

    from minillm.testing import check_layer

    report = check_layer(forward, backward, (x, w))   # float64 central differences, one row per input
    print(report)                                    # shape, max abs diff, relative error, verdict
    report.assert_ok()                               # AssertionError with the table, inside a test

A layer here is a pair: forward(*inputs, **kwargs) -> (out, cache) and backward(dout, cache) ->
the gradients of the inputs, in their order (see minillm/layers/). Each verdict is exact, ok,
WRONG, unchecked (both gradients zero: nothing was tested, which fails) or skipped (integer ids,
absent inputs); a WRONG row names its worst element and, where it can, the mistake: a constant
factor, a transpose, a missing sum over the broadcast axes, a path left out (minillm/testing/report.py).

    minillm.testing.strategies   hypothesis strategies of sizes and inputs (the test extra)
    minillm.testing.cases        minillm's own layers, and the model's block, as ready checks
    minillm.testing.numeric      the finite differences and the relative error, on their own

The error measure is the worst element's difference over the array's largest gradient, and the
tolerance 1e-6 (TOLERANCE); see minillm/testing/numeric.py for the difference formula and its steps.
"""

from minillm.testing.check import check_layer, compare
from minillm.testing.numeric import TOLERANCE, numerical_gradient, relative_error
from minillm.testing.report import GradientReport, Row

__all__ = ["TOLERANCE", "GradientReport", "Row", "check_layer", "compare", "numerical_gradient", "relative_error"]
