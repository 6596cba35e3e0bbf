"""AdamW follows its docstring's equations step by step, on its reference update and its fast one,
and its state_dict resumes it exactly.

(Weight decay groups, clipping and the schedule: tests/test_invariants.py.)
"""

import math

import numpy
import pytest

from minillm.fast import adamw
from minillm.optim import AdamW


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_adamw_matches_its_equations_over_several_steps(reference):
    rng = numpy.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    start = {k: v.copy() for k, v in params.items()}
    lr, (b1, b2), eps, wd = 0.01, (0.8, 0.9), 1e-8, 0.5
    optimizer = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, reference=reference)
    expected = {k: v.copy() for k, v in start.items()}
    m = {k: numpy.zeros_like(v) for k, v in start.items()}
    v = {k: numpy.zeros_like(x) for k, x in start.items()}
    for t in range(1, 4):
        grads = {k: rng.normal(size=p.shape) for k, p in params.items()}
        optimizer.step(grads)
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            decay = wd if k == "w" else 0.0  # matrices decay, vectors do not
            expected[k] = expected[k] * (1 - lr * decay)
            expected[k] -= lr * (m[k] / (1 - b1**t)) / (numpy.sqrt(v[k] / (1 - b2**t)) + eps)
    for k in params:
        numpy.testing.assert_allclose(params[k], expected[k], rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, adamw.CHUNK // 3 + 5), (2 * adamw.CHUNK + 1,), (adamw.CHUNK,)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_fast_update_of_a_large_parameter_a_chunk_at_a_time_equals_its_whole_update_to_the_bit(shape, dtype):
    """Above CHUNK elements the fast update goes chunk by chunk; each element gets the same operations."""
    rng = numpy.random.default_rng(3)
    p, g, m, v = (rng.normal(size=shape).astype(dtype) for _ in range(4))
    v = numpy.abs(v)
    whole = [x.copy() for x in (p, m, v)]
    for t in (1, 2):
        adamw.adamw_update(p, g, m, v, 0.01, t, 0.9, 0.95, 1e-8, 0.1)
        adamw.update_in_place(whole[0], g, whole[1], whole[2], 0.9, 0.95, 1e-8, 1 - 0.01 * 0.1,
                              0.01 / (1 - 0.9**t), 1 / math.sqrt(1 - 0.95**t))
    for got, expected in zip((p, m, v), whole):
        assert got.dtype == numpy.dtype(dtype) and numpy.array_equal(got, expected)


def test_a_parameter_that_is_not_contiguous_is_updated_in_place_all_the_same():
    rng = numpy.random.default_rng(4)
    base = rng.normal(size=(adamw.CHUNK + 7, 2))
    p, contiguous = base[:, 0], base[:, 0].copy()  # p: a strided view into base
    g, m, v = rng.normal(size=p.shape), numpy.zeros(p.shape), numpy.zeros(p.shape)
    m2, v2 = m.copy(), v.copy()
    adamw.adamw_update(p, g, m, v, 0.01, 1, 0.9, 0.95, 1e-8, 0.1)
    adamw.adamw_update(contiguous, g, m2, v2, 0.01, 1, 0.9, 0.95, 1e-8, 0.1)
    assert numpy.array_equal(base[:, 0], contiguous) and numpy.array_equal(m, m2)


def test_state_dict_round_trip_resumes_identically():
    rng = numpy.random.default_rng(1)
    grads = [{"w": rng.normal(size=(2, 3))} for _ in range(4)]
    straight = AdamW({"w": numpy.ones((2, 3))})
    for g in grads:
        straight.step(g)
    first = AdamW({"w": numpy.ones((2, 3))})
    for g in grads[:2]:
        first.step(g)
    second = AdamW({"w": first.params["w"].copy()})
    second.load_state_dict({k: v if k == "t" else {"w": v["w"].copy()} for k, v in first.state_dict().items()})
    for g in grads[2:]:
        second.step(g)
    numpy.testing.assert_array_equal(second.params["w"], straight.params["w"])
