"""minillm.testing, the public gradient checker, on hand-built layers whose right and wrong answers are known:
a right layer passes, each kind of mistake fails with its diagnosis, nothing unchecked passes silently."""

import subprocess
import sys

import numpy
import pytest

from minillm import backend
from minillm.layers import linear
from minillm.testing import check_layer, compare

RNG = numpy.random.default_rng(7)
X, W, B = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(4, 5)), RNG.normal(size=5)


def linear_forward(x, w, b):
    return x @ w + b, (x, w)


def linear_backward(dout, cache):
    x, w = cache
    return dout @ w.T, x.reshape(-1, x.shape[-1]).T @ dout.reshape(-1, dout.shape[-1]), dout.sum(axis=(0, 1))


def with_grads(change):
    """linear_backward with its (dx, dw, db) passed through change."""
    return lambda dout, cache: change(*linear_backward(dout, cache))


def row(report, name):
    return next(r for r in report.rows if r.name == name)


def test_a_right_layer_passes_with_every_input_ok():
    report = check_layer(linear_forward, linear_backward, (X, W, B))
    assert report.ok and [r.verdict for r in report.rows] == ["ok", "ok", "ok"]
    assert [r.name for r in report.rows] == ["x", "w", "b"]  # forward's parameter names
    assert "passed" in str(report)
    report.assert_ok()


def test_identical_arrays_compare_exact_and_a_difference_is_wrong():
    assert compare({"p": X.copy()}, {"p": X}).rows[0].verdict == "exact"
    report = compare({"p": X + 1e-3}, {"p": X})
    assert not report.ok and report.rows[0].verdict == "WRONG"


def test_a_constant_factor_is_named():
    report = check_layer(linear_forward, with_grads(lambda dx, dw, db: (2 * dx, -dw, db / 6)), (X, W, B))
    assert [r.verdict for r in report.rows] == ["WRONG"] * 3
    assert "2x the right answer" in str(row(report, "x").detail)
    assert "-1x the right answer (the sign flipped)" in str(row(report, "w").detail)
    assert "1/6 of the right answer" in str(row(report, "b").detail)  # a mean over the 6 rows, not a sum
    with pytest.raises(AssertionError, match="WRONG"):
        report.assert_ok()


def test_a_single_non_zero_element_is_called_a_factor_only_when_it_is_a_simple_one():
    report = compare({"p": numpy.array([0.0, 0.2206])}, {"p": numpy.array([0.0, 1.0])})
    assert not report.ok and "factor" not in str(report) and "worst element [1]" in str(report)
    assert "2x the right answer" in str(compare({"p": numpy.array([0.0, 2.0])}, {"p": numpy.array([0.0, 1.0])}))


def test_a_transposed_weight_gradient_is_named_square_or_not():
    transposed = with_grads(lambda dx, dw, db: (dx, dw.T, db))
    for w in (W, RNG.normal(size=(4, 4))):
        report = check_layer(linear_forward, transposed, (X, w, B[: w.shape[1]]))
        assert row(report, "w").verdict == "WRONG" and "transpose" in str(row(report, "w").detail), report


def test_a_bias_gradient_not_summed_over_batch_and_time_is_named():
    report = check_layer(linear_forward, with_grads(lambda dx, dw, db: (dx, dw, None)), (X, W, B))
    assert row(report, "b").verdict == "WRONG"  # None, but the output depends on b
    unsummed = lambda dout, cache: (*linear_backward(dout, cache)[:2], dout)
    detail = str(row(check_layer(linear_forward, unsummed, (X, W, B)), "b").detail)
    assert "summed over axes (0, 1) it is right" in detail


def test_a_missing_path_is_zero_where_it_should_not_be():
    report = check_layer(linear_forward, with_grads(lambda dx, dw, db: (0 * dx, dw, db)), (X, W, B))
    assert "zero where the numeric one is not: the path from the output to this input is missing" in str(
        row(report, "x").detail)
    assert "worst element" in str(row(report, "x").detail)


def test_a_gradient_zero_in_both_is_unchecked_and_fails():
    def forward(x, y):
        return x * 2.0, None

    report = check_layer(forward, lambda dout, cache: (2.0 * dout, numpy.zeros((3,))), (X, RNG.normal(size=3)))
    assert row(report, "y").verdict == "unchecked" and not report.ok


def test_none_for_an_input_the_output_does_not_depend_on_is_skipped():
    def forward(x, y):
        return x * 2.0, None

    report = check_layer(forward, lambda dout, cache: (2.0 * dout, None), (X, RNG.normal(size=3)))
    assert row(report, "y").verdict == "skipped" and report.ok


def test_a_nan_fails():
    report = check_layer(linear_forward, with_grads(lambda dx, dw, db: (dx * numpy.nan, dw, db)), (X, W, B))
    assert row(report, "x").verdict == "WRONG" and "NaN" in str(row(report, "x").detail) and not report.ok


def test_integer_inputs_and_keyword_arguments_are_not_differentiated():
    def forward(idx, table, scale):
        return table[idx] * scale, (idx, table.shape, scale)

    def backward(dout, cache):  # the token ids have no gradient, and backward leaves them out
        idx, shape, scale = cache
        dtable = numpy.zeros(shape)
        numpy.add.at(dtable, idx, dout * scale)
        return (dtable,)

    idx = numpy.array([[0, 2, 2], [1, 0, 2]])
    report = check_layer(forward, backward, (idx, RNG.normal(size=(3, 4))), kwargs={"scale": 3.0})
    assert [r.verdict for r in report.rows] == ["skipped", "ok"] and report.ok


def test_absent_inputs_must_get_none():
    assert check_layer(linear.forward, linear.backward, (X, W, None)).ok
    gives_db = lambda dout, cache: (*linear.backward(dout, cache)[:2], numpy.zeros(5))
    report = check_layer(linear.forward, gives_db, (X, W, None))
    assert not report.ok and row(report, "b").verdict == "WRONG"  # None given, a gradient returned


def test_float32_inputs_are_checked_in_float64_and_left_as_they_were():
    x32, w32, b32 = X.astype(numpy.float32), W.astype(numpy.float32), B.astype(numpy.float32)
    before = x32.copy()
    report = check_layer(linear_forward, linear_backward, (x32, w32, b32))
    assert report.ok and "float32" in str(report) and "float64" in str(report)
    assert numpy.array_equal(x32, before) and x32.dtype == numpy.float32


def test_the_wrong_number_of_gradients_is_one_clear_problem():
    report = check_layer(linear_forward, lambda dout, cache: linear_backward(dout, cache)[:2], (X, W, B))
    assert not report.ok and "returned 2 gradient(s), but there are 3 inputs (x, w, b)" in str(report)


def test_a_forward_without_its_cache_is_one_clear_error():
    with pytest.raises(TypeError, match=r"must return \(out, cache\), got ndarray"):
        check_layer(lambda x: x * 2.0, lambda dout, cache: dout, (X,))


def test_a_layer_drawing_random_numbers_draws_the_same_ones_in_every_evaluation():
    def dropout_forward(x, rng):
        mask = (rng.uniform(x.shape, x.dtype) >= 0.5) * 2.0
        return x * mask, mask

    def global_dropout_forward(x):
        mask = (numpy.random.random(x.shape) >= 0.5) * 2.0
        return x * mask, mask

    backward = lambda dout, mask: dout * mask
    assert check_layer(dropout_forward, backward, (X,), kwargs={"rng": backend.RNG(3)}).ok
    assert check_layer(global_dropout_forward, backward, (X,)).ok


def test_strategies_say_what_to_install_and_the_checker_works_without_hypothesis():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "from minillm.testing import check_layer\n"
            "try:\n    import minillm.testing.strategies\nexcept ImportError as err:\n    print(err)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "needs hypothesis: pip install" in result.stdout
