"""AdamW follows its docstring's equations step by step, on its reference update and its fast one,
and its state_dict resumes it exactly.

(Weight decay groups, clipping and the schedule: tests/test_invariants.py.)
"""

import numpy
import pytest

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
