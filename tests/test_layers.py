"""Every layer's backward against central finite differences, in float64, over generated shapes.

For a layer out = f(inputs), the checked objective is L = sum(out * R) with a fixed
random R, so dL/dout = R is what backward receives. Each gradient is compared with
minillm.gradcheck.gradient_error (max |analytic - numeric| / max |gradient| over the
array, with fourth-order central differences) against gradcheck.TOLERANCE = 1e-6. Shapes include batch 1, sequence length 1,
one head and odd sizes; inputs and weights are random normals, never zeros.
"""

import numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import backend, gradcheck
from minillm.layers import attention, cross_entropy, dropout, embedding, gelu, layernorm, linear, mlp, softmax

CHECK = settings(max_examples=40, deadline=None)
batch = st.integers(1, 3)
time = st.integers(1, 5)
width = st.integers(1, 7)
seeds = st.integers(0, 2**32 - 1)


def assert_gradients_match(forward, backward, inputs, differentiable):
    """forward(**inputs) -> (out, cache); backward(R, cache) returns grads in the order of `differentiable`."""
    rng = numpy.random.default_rng(0)
    out, cache = forward(**inputs)
    R = rng.normal(size=out.shape)
    analytic = backward(R, cache)
    analytic = analytic if isinstance(analytic, tuple) else (analytic,)
    assert len(analytic) == len(differentiable)
    for name, grad in zip(differentiable, analytic):
        assert grad.shape == inputs[name].shape, name
        error = gradcheck.gradient_error(grad, lambda: (forward(**inputs)[0] * R).sum(), inputs[name])
        assert error <= gradcheck.TOLERANCE, f"d{name}: relative error {error:.2e}"


@CHECK
@given(B=batch, T=time, n_in=width, n_out=width, bias=st.booleans(), seed=seeds)
def test_linear(B, T, n_in, n_out, bias, seed):
    rng = numpy.random.default_rng(seed)
    inputs = dict(x=rng.normal(size=(B, T, n_in)), w=rng.normal(size=(n_in, n_out)),
                  b=rng.normal(size=n_out) if bias else None)
    if bias:
        assert_gradients_match(linear.forward, linear.backward, inputs, ["x", "w", "b"])
    else:
        assert_gradients_match(linear.forward, lambda d, c: linear.backward(d, c)[:2], inputs, ["x", "w"])
        assert linear.backward(numpy.ones((B, T, n_out)), linear.forward(**inputs)[1])[2] is None


# From C = 3: with two features x_hat = +-1 whatever x is (up to eps), so dx is of the
# order of eps = 1e-5 and float64 finite differences cannot resolve it.
@CHECK
@given(B=batch, T=time, C=st.integers(3, 9), bias=st.booleans(), seed=seeds)
def test_layernorm(B, T, C, bias, seed):
    rng = numpy.random.default_rng(seed)
    inputs = dict(x=rng.normal(size=(B, T, C)) * 3 + 1, w=rng.normal(size=C), b=rng.normal(size=C) if bias else None)
    names = ["x", "w", "b"] if bias else ["x", "w"]
    assert_gradients_match(layernorm.forward, lambda d, c: layernorm.backward(d, c)[: len(names)], inputs, names)


@CHECK
@given(B=batch, T=time, C=width, seed=seeds)
def test_gelu(B, T, C, seed):
    x = numpy.random.default_rng(seed).normal(size=(B, T, C)) * 2
    assert_gradients_match(gelu.forward, gelu.backward, dict(x=x), ["x"])


@CHECK
@given(B=batch, T=time, N=st.integers(1, 7), seed=seeds)
def test_softmax(B, T, N, seed):
    s = numpy.random.default_rng(seed).normal(size=(B, T, N)) * 2
    assert_gradients_match(softmax.forward, softmax.backward, dict(s=s), ["s"])


@CHECK
@given(B=batch, T=time, C=width, p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), seed=seeds)
def test_dropout_backward_reuses_the_forward_mask(B, T, C, p, seed):
    x = numpy.random.default_rng(seed).normal(size=(B, T, C))

    def forward(x):
        # A fresh generator with the same seed: every perturbed pass draws the same mask.
        return dropout.forward(x, p, backend.RNG(seed, "cpu"))

    assert_gradients_match(forward, dropout.backward, dict(x=x), ["x"])


@CHECK
@given(B=batch, T=time, V=st.integers(1, 4), C=width, extra_positions=st.integers(0, 2), seed=seeds)
def test_embedding_scatter_adds_repeated_tokens(B, T, V, C, extra_positions, seed):
    rng = numpy.random.default_rng(seed)
    idx = rng.integers(0, V, size=(B, T))  # V <= 4 makes repeats common
    inputs = dict(idx=idx, wte=rng.normal(size=(V, C)), wpe=rng.normal(size=(T + extra_positions, C)))
    assert_gradients_match(embedding.forward, embedding.backward, inputs, ["wte", "wpe"])


@CHECK
@given(B=batch, T=time, C=st.integers(1, 4), seed=seeds)
def test_mlp(B, T, C, seed):
    rng = numpy.random.default_rng(seed)
    inputs = dict(x=rng.normal(size=(B, T, C)), w_fc=rng.normal(size=(C, 4 * C)), b_fc=rng.normal(size=4 * C),
                  w_proj=rng.normal(size=(4 * C, C)), b_proj=rng.normal(size=C))
    assert_gradients_match(mlp.forward, mlp.backward, inputs, ["x", "w_fc", "b_fc", "w_proj", "b_proj"])


@CHECK
@given(B=batch, T=time, n_head=st.integers(1, 3), head_size=st.integers(1, 3),
       dropout_p=st.sampled_from([0.0, 0.3]), bias=st.booleans(), seed=seeds)
def test_attention(B, T, n_head, head_size, dropout_p, bias, seed):
    rng = numpy.random.default_rng(seed)
    C = n_head * head_size
    inputs = dict(
        x=rng.normal(size=(B, T, C)), w_attn=rng.normal(size=(C, 3 * C)) * 0.5,
        b_attn=rng.normal(size=3 * C) if bias else None, w_proj=rng.normal(size=(C, C)),
        b_proj=rng.normal(size=C) if bias else None,
    )

    def forward(**inputs):
        return attention.forward(**inputs, n_head=n_head, dropout_p=dropout_p, rng=backend.RNG(seed, "cpu"))

    names = ["x", "w_attn", "b_attn", "w_proj", "b_proj"] if bias else ["x", "w_attn", "w_proj"]

    def backward(dout, cache):
        dx, dw_attn, db_attn, dw_proj, db_proj = attention.backward(dout, cache)
        return (dx, dw_attn, db_attn, dw_proj, db_proj) if bias else (dx, dw_attn, dw_proj)

    assert_gradients_match(forward, backward, inputs, names)


@CHECK
@given(B=batch, T=time, V=st.integers(2, 6), seed=seeds)
def test_cross_entropy_with_ignored_targets(B, T, V, seed):
    rng = numpy.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)) * 2
    targets = rng.integers(0, V, size=(B, T))
    targets[rng.random(size=(B, T)) < 0.3] = cross_entropy.IGNORE_INDEX

    def forward(logits):
        return cross_entropy.forward(logits, targets)

    def backward(dloss, cache):
        return cross_entropy.backward(float(dloss), cache)

    assert_gradients_match(forward, backward, dict(logits=logits), ["logits"])
