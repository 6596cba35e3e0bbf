"""Every layer's hand-written backward matches central finite differences, for every input and parameter,
in both readings: the reference (minillm.layers) and the fast twins (minillm.fast), and the model's block.

Each test is a call of the public checker, minillm.testing.check_layer, on the cases of
minillm.testing.cases, over sizes drawn by minillm.testing.strategies (batch 1, sequence length 1,
one head and odd sizes included): what a user checks their own layer with is what checks ours.
The cases say how each layer's inputs are conditioned (LayerNorm's width, softmax over at least two
entries, repeated tokens, ignored targets, dropout masks that keep something).
"""

import numpy
import pytest
from hypothesis import example, given, strategies as st

import minillm.fast
import minillm.layers
from minillm.layers import cross_entropy, layernorm
from minillm.model import block_backward, block_forward
from minillm.testing import TOLERANCE, cases, relative_error, strategies

READINGS = pytest.mark.parametrize("layers", [minillm.layers, minillm.fast], ids=["reference", "fast"])
SMALLEST = cases.Sizes(batch=1, time=1, n_head=1, head_size=1, vocab=2, bias=True)
LARGEST = cases.Sizes(batch=3, time=5, n_head=3, head_size=3, vocab=7, bias=False)


@READINGS
@pytest.mark.parametrize("name", [name for name in cases.LAYER_NAMES if name not in ("dropout", "attention")])
@example(sizes=SMALLEST, seed=0)
@example(sizes=LARGEST, seed=1)
@given(sizes=strategies.sizes(), seed=strategies.seeds())
def test_layer(layers, name, sizes, seed):
    cases.layer_case(name, getattr(layers, name), sizes, seed).check().assert_ok()


@READINGS
@pytest.mark.parametrize("name", ["dropout", "attention"])
@example(sizes=SMALLEST, dropout_p=0.3, seed=0)
@example(sizes=LARGEST, dropout_p=0.9, seed=1)
@given(sizes=strategies.sizes(), dropout_p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), seed=strategies.seeds())
def test_layer_with_dropout(layers, name, sizes, dropout_p, seed):
    cases.layer_case(name, getattr(layers, name), sizes, seed, dropout_p).check().assert_ok()


@READINGS
@example(sizes=SMALLEST, dropout_p=0.3, seed=0)
@given(sizes=strategies.sizes(max_batch=2, max_time=3), dropout_p=st.sampled_from([0.0, 0.3]),
       seed=strategies.seeds())
def test_block(layers, sizes, dropout_p, seed):
    cases.block_case(block_forward, block_backward, layers, sizes, seed, dropout_p).check().assert_ok()


@given(B=st.integers(1, 3), T=st.integers(1, 5), C=st.integers(1, 2), seed=strategies.seeds())
def test_layernorm_of_one_or_two_features_against_closed_forms(B, T, C, seed):
    """C = 1: x_hat = 0, so dx = dw = 0 and db = sum of R. C = 2, per row with d = (x_0 - x_1) / 2:
    x_hat = (s, -s), s = d / sqrt(d^2 + eps), ds/dx_0 = -ds/dx_1 = eps / (2 (d^2 + eps)^1.5), so
    dx_0 = -dx_1 = (w_0 R_0 - w_1 R_1) ds/dx_0, dw = sum over rows of R * x_hat, db = sum of R.
    (Finite differences cannot resolve these: see minillm/testing/cases.py.)"""
    rng = numpy.random.default_rng(seed)
    x, w, b, R = rng.normal(size=(B, T, C)) * 2 + 1, rng.normal(size=C), rng.normal(size=C), rng.normal(size=(B, T, C))
    dx, dw, db = layernorm.backward(R, layernorm.forward(x, w, b)[1])
    if C == 1:
        expected_dx, expected_dw = numpy.zeros_like(x), numpy.zeros(1)
    else:
        d = (x[..., 0] - x[..., 1]) / 2
        s = d / numpy.sqrt(d * d + layernorm.EPS)
        ds = layernorm.EPS / (2 * (d * d + layernorm.EPS) ** 1.5)
        g = (w[0] * R[..., 0] - w[1] * R[..., 1]) * ds
        expected_dx = numpy.stack([g, -g], axis=-1)
        expected_dw = numpy.array([(R[..., 0] * s).sum(), -(R[..., 1] * s).sum()])
    for got, expected in [(dx, expected_dx), (dw, expected_dw), (db, R.sum(axis=(0, 1)))]:
        assert relative_error(got, expected) <= TOLERANCE


@READINGS
def test_cross_entropy_with_every_target_ignored_is_zero_and_has_zero_gradient(layers):
    """Nothing counted: the loss is 0 and so is its gradient (the checker would call that unchecked)."""
    logits = numpy.random.default_rng(0).normal(size=(2, 3, 4))
    targets = numpy.full((2, 3), cross_entropy.IGNORE_INDEX)
    loss, cache = layers.cross_entropy.forward(logits, targets)
    assert float(loss) == 0.0 and not layers.cross_entropy.backward(1.0, cache).any()
