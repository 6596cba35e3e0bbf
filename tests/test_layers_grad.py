"""Every reference layer's (minillm.layers) hand-written backward matches central finite differences,
for every input and parameter. (The fast layers are checked against these in test_fast.py.)

For out = f(inputs) the objective is L = sum(out * R) with a fixed random R, so the
backward pass receives dout = R; for cross-entropy L = loss * r with a scalar r.
Each analytic gradient is compared with gradcheck.numerical_gradient (float64) by
gradcheck.relative_error <= gradcheck.TOLERANCE (1e-6). Shapes are drawn by
hypothesis and include batch 1, sequence length 1, one head and odd sizes; inputs
and weights are random normals from a generator seeded by a drawn seed.
"""

import numpy
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import assert_gradients_match
from minillm import backend, gradcheck
from minillm.layers import attention, cross_entropy, dropout, embedding, gelu, layernorm, linear, lora, mlp, softmax

B = st.integers(1, 3)
T = st.integers(1, 5)
WIDTH = st.integers(1, 7)
SEED = st.integers(0, 2**32 - 1)


def normal(rng, *shape, scale=1.0):
    return rng.normal(size=shape) * scale


def check(forward, backward, inputs, names, seed):
    """Check the gradients of the inputs `names` (backward's order); inputs that are None (absent
    biases) are skipped, and backward must return None in their place."""
    keep = [i for i, name in enumerate(names) if inputs[name] is not None]

    def kept(dout, cache):
        grads = backward(dout, cache)
        assert len(grads) == len(names) and all(grads[i] is None for i in range(len(names)) if i not in keep)
        return tuple(grads[i] for i in keep)

    assert_gradients_match(forward, kept, inputs, [names[i] for i in keep], seed)


@given(B=B, T=T, n_in=WIDTH, n_out=WIDTH, bias=st.booleans(), seed=SEED)
def test_linear(B, T, n_in, n_out, bias, seed):
    rng = numpy.random.default_rng(seed)
    inputs = dict(x=normal(rng, B, T, n_in), w=normal(rng, n_in, n_out), b=normal(rng, n_out) if bias else None)
    check(linear.forward, linear.backward, inputs, ["x", "w", "b"], seed)


@given(n_in=WIDTH, n_out=WIDTH, rank=st.integers(1, 3), scale=st.floats(0.1, 4.0), seed=SEED)
def test_lora(n_in, n_out, rank, scale, seed):
    rng = numpy.random.default_rng(seed)
    inputs = dict(w=normal(rng, n_in, n_out), a=normal(rng, n_in, rank), b=normal(rng, rank, n_out))

    def forward(w, a, b):
        return lora.forward(w, a, b, scale)

    assert_gradients_match(forward, lora.backward, inputs, ["w", "a", "b"], seed)


# From C = 3. With C = 2, x_hat = +-d / sqrt(d^2 + eps) (d = half the difference of the two
# features) is +-1 up to eps, so dx ~ eps / |d|^3 is ~1e-7 while L is ~1: float64 rounding
# in L (~1e-16 / h) then gives finite-difference errors of ~1e-6 relative (seen: 1.2e-6 at
# h = 1e-4, 4e-6 at h = 1e-5) although the analytic dx agrees with a 50-digit reference to
# 4e-11. C = 1 and C = 2 are checked against their closed forms below instead.
@given(B=B, T=T, C=st.integers(3, 7), bias=st.booleans(), seed=SEED)
def test_layernorm(B, T, C, bias, seed):
    rng = numpy.random.default_rng(seed)
    inputs = dict(x=normal(rng, B, T, C, scale=2.0) + 1.0, w=normal(rng, C), b=normal(rng, C) if bias else None)
    check(layernorm.forward, layernorm.backward, inputs, ["x", "w", "b"], seed)


@given(B=B, T=T, C=st.integers(1, 2), seed=SEED)
def test_layernorm_of_one_or_two_features_against_closed_forms(B, T, C, seed):
    """C = 1: x_hat = 0, so dx = dw = 0 and db = sum of R. C = 2, per row with d = (x_0 - x_1) / 2:
    x_hat = (s, -s), s = d / sqrt(d^2 + eps), ds/dx_0 = -ds/dx_1 = eps / (2 (d^2 + eps)^1.5), so
    dx_0 = -dx_1 = (w_0 R_0 - w_1 R_1) ds/dx_0, dw = sum over rows of R * x_hat, db = sum of R."""
    rng = numpy.random.default_rng(seed)
    x, w, b, R = normal(rng, B, T, C, scale=2.0) + 1.0, normal(rng, C), normal(rng, C), normal(rng, B, T, C)
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
        assert gradcheck.relative_error(got, expected) <= gradcheck.TOLERANCE


@given(B=B, T=T, C=WIDTH, seed=SEED)
def test_gelu(B, T, C, seed):
    x = normal(numpy.random.default_rng(seed), B, T, C, scale=2.0)
    assert_gradients_match(gelu.forward, gelu.backward, dict(x=x), ["x"], seed)


@given(B=B, T=T, N=WIDTH, seed=SEED)
def test_softmax(B, T, N, seed):
    s = normal(numpy.random.default_rng(seed), B, T, N, scale=2.0)
    assert_gradients_match(softmax.forward, softmax.backward, dict(s=s), ["s"], seed)


@given(B=B, T=T, C=WIDTH, p=st.sampled_from([0.1, 0.5, 0.9]), seed=SEED)
def test_dropout(B, T, C, p, seed):
    x = normal(numpy.random.default_rng(seed), B, T, C)

    def forward(x):
        # A fresh generator with the same seed on every call: every pass draws the same mask.
        return dropout.forward(x, p, backend.RNG(seed, "cpu"))

    assert_gradients_match(forward, dropout.backward, dict(x=x), ["x"], seed)


@example(B=3, T=5, V=2, C=3, extra_positions=0, seed=0)  # many repeats
@given(B=B, T=T, V=st.integers(1, 3), C=WIDTH, extra_positions=st.integers(0, 2), seed=SEED)
def test_embedding_with_repeated_tokens(B, T, V, C, extra_positions, seed):
    rng = numpy.random.default_rng(seed)
    idx = rng.integers(0, V, size=(B, T))
    idx.flat[-1] = idx.flat[0]  # a repeated token whenever there are two positions
    inputs = dict(idx=idx, wte=normal(rng, V, C), wpe=normal(rng, T + extra_positions, C))
    assert_gradients_match(embedding.forward, embedding.backward, inputs, ["wte", "wpe"], seed)


@given(B=B, T=T, C=st.integers(1, 4), bias=st.booleans(), seed=SEED)
def test_mlp(B, T, C, bias, seed):
    rng = numpy.random.default_rng(seed)
    inputs = dict(x=normal(rng, B, T, C), w_fc=normal(rng, C, 4 * C), b_fc=normal(rng, 4 * C) if bias else None,
                  w_proj=normal(rng, 4 * C, C), b_proj=normal(rng, C) if bias else None)
    check(mlp.forward, mlp.backward, inputs, ["x", "w_fc", "b_fc", "w_proj", "b_proj"], seed)


@example(B=1, T=1, n_head=1, head_size=1, dropout_p=0.3, bias=True, seed=0)  # the smallest case
@example(B=3, T=5, n_head=3, head_size=3, dropout_p=0.3, bias=False, seed=1)  # the largest
@given(B=B, T=T, n_head=st.integers(1, 3), head_size=st.integers(1, 3),
       dropout_p=st.sampled_from([0.0, 0.3]), bias=st.booleans(), seed=SEED)
def test_attention(B, T, n_head, head_size, dropout_p, bias, seed):
    rng = numpy.random.default_rng(seed)
    C = n_head * head_size
    inputs = dict(x=normal(rng, B, T, C), w_attn=normal(rng, C, 3 * C, scale=0.5),
                  b_attn=normal(rng, 3 * C) if bias else None, w_proj=normal(rng, C, C),
                  b_proj=normal(rng, C) if bias else None)

    def forward(**inputs):
        return attention.forward(**inputs, n_head=n_head, dropout_p=dropout_p, rng=backend.RNG(seed, "cpu"))

    check(forward, attention.backward, inputs, ["x", "w_attn", "b_attn", "w_proj", "b_proj"], seed)


@example(B=1, T=1, V=2, ignored=0.0, seed=0)
@example(B=2, T=3, V=2, ignored=1.0, seed=0)  # every target ignored
@given(B=B, T=T, V=st.integers(2, 7), ignored=st.floats(0.0, 1.0), seed=SEED)
def test_cross_entropy(B, T, V, ignored, seed):
    rng = numpy.random.default_rng(seed)
    targets = rng.integers(0, V, size=(B, T))
    targets[rng.random(size=(B, T)) < ignored] = cross_entropy.IGNORE_INDEX  # sometimes all of them

    def forward(logits):
        return cross_entropy.forward(logits, targets)

    def backward(r, cache):  # L = loss * r: dloss = r, a scalar
        return cross_entropy.backward(float(r), cache)

    assert_gradients_match(forward, backward, dict(logits=normal(rng, B, T, V, scale=2.0)), ["logits"], seed)
