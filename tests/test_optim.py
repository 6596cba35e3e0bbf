"""AdamW, gradient clipping and the learning-rate schedule do what their docstrings' equations say."""

import math

import numpy
import pytest

from minillm.optim import AdamW, clip_grad_norm, cosine_lr


def test_adamw_matches_its_equations_over_several_steps():
    rng = numpy.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    start = {k: v.copy() for k, v in params.items()}
    lr, (b1, b2), eps, wd = 0.01, (0.8, 0.9), 1e-8, 0.5
    optimizer = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
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


def test_weight_decay_shrinks_matrices_only():
    params = {"w": numpy.ones((2, 2)), "b": numpy.ones(2)}
    optimizer = AdamW(params, lr=0.1, weight_decay=0.5)
    optimizer.step({k: numpy.zeros_like(p) for k, p in params.items()})
    numpy.testing.assert_allclose(params["w"], 0.95)
    numpy.testing.assert_array_equal(params["b"], 1.0)


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


def test_clipping_scales_to_the_limit_and_returns_the_norm_before():
    grads = {"a": numpy.array([3.0, 0.0]), "b": numpy.array([[4.0]])}
    norm = clip_grad_norm(grads, 1.0)
    assert float(norm) == pytest.approx(5.0)
    numpy.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-6)
    numpy.testing.assert_allclose(grads["b"], [[0.8]], rtol=1e-6)
    assert float(clip_grad_norm(grads, 10.0)) == pytest.approx(1.0, rel=1e-6)
    numpy.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-6)  # under the limit: untouched


def test_cosine_schedule_warms_up_decays_and_floors():
    lr = [cosine_lr(step, 1.0, 0.1, warmup_iters=10, decay_iters=110) for step in range(130)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lr[:10], lr[1:10]))
    assert lr[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:110], lr[11:111]))
    assert lr[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(x == 0.1 for x in lr[110:])
