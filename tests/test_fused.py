"""The fused kernels of the fast layers (minillm.fast) compute what their plain array code computes.

Each fast layer with a fused path (backend.fuse) runs twice on the same inputs: with
fused kernels switched off (its plain array code) and on; AdamW's fused step likewise.
(The plain code itself is checked against the reference layers in test_fast.py.) On a
GPU cupy.fuse compiles the fused functions, which checks the kernels. On the
CPU the layers would take the plain path both times, so the tests force the
fused path there: the fused functions' bodies then run as NumPy code, which
checks their equations and the way each layer feeds them.
Shapes come from hypothesis, down to one row of one element.
"""

import contextlib
from unittest import mock

import numpy
import pytest
from hypothesis import given, strategies as st

from minillm import backend, optim
from minillm.fast import adamw, attention, gelu, layernorm, softmax

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not backend.cuda_available(),
                                                                reason="needs CuPy and a CUDA GPU"))]
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9))
dtypes = st.sampled_from(["float32", "float64"])


@contextlib.contextmanager
def fused_path():
    """The fused path wherever fused kernels are on, host arrays included (fusing patched in the fast modules)."""
    with contextlib.ExitStack() as stack:
        for module in (gelu, layernorm, softmax, attention, adamw):
            stack.enter_context(mock.patch.object(module, "fusing", lambda *arrays: backend._fusion["enabled"]))
        yield


def inputs(device, dtype, seed, *shapes):
    rng = numpy.random.default_rng(seed)
    return [backend.to_device(rng.normal(size=shape).astype(dtype), device) for shape in shapes]


def assert_close(got, expected, dtype):
    got, expected = backend.to_host(got), backend.to_host(expected)
    assert got.dtype == expected.dtype == numpy.dtype(dtype)  # no promotion either way
    scale = max(float(numpy.abs(expected).max()), 1e-30)
    assert float(numpy.abs(got - expected).max()) <= TOLERANCE[dtype] * scale


def both_paths(run):
    """(plain, fused) results of run()."""
    with fused_path():
        with backend.fused_kernels(False):
            plain = run()
        return plain, run()


def assert_paths_agree(run, dtype):
    plain, fused = both_paths(run)
    for got, expected in zip(fused, plain):
        if expected is not None:
            assert_close(got, expected, dtype)


def forward_and_backward(layer, dout, *args, **options):
    """run() for both_paths: the layer's output and its gradients for dout."""
    def run():
        out, cache = layer.forward(*args, **options)
        grads = layer.backward(dout, cache)
        return (out, *(grads if isinstance(grads, tuple) else (grads,)))
    return run


@pytest.mark.parametrize("layer", [gelu, softmax], ids=["gelu", "softmax"])
@pytest.mark.parametrize("device", DEVICES)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16))
def test_one_input_layers(device, layer, shape, dtype, seed):
    x, dout = inputs(device, dtype, seed, shape, shape)
    assert_paths_agree(forward_and_backward(layer, dout, x), dtype)


@pytest.mark.parametrize("device", DEVICES)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16), bias=st.booleans())
def test_layernorm(device, shape, dtype, seed, bias):
    C = shape[-1]
    x, w, b, dout = inputs(device, dtype, seed, shape, (C,), (C,), shape)
    assert_paths_agree(forward_and_backward(layernorm, dout, x, w, b if bias else None), dtype)


@pytest.mark.parametrize("device", DEVICES)
@given(B=st.integers(1, 2), T=st.integers(1, 7), n_head=st.integers(1, 3), hs=st.integers(1, 3),
       query_block=st.integers(1, 8), dtype=dtypes, seed=st.integers(0, 2**16))
def test_attention(device, B, T, n_head, hs, query_block, dtype, seed):
    C = n_head * hs
    x, w_attn, b_attn, w_proj, b_proj, dout = inputs(device, dtype, seed, (B, T, C), (C, 3 * C), (3 * C,), (C, C),
                                                     (C,), (B, T, C))
    run = forward_and_backward(attention, dout, x, w_attn, b_attn, w_proj, b_proj, n_head, query_block=query_block)
    assert_paths_agree(run, dtype)


@pytest.mark.parametrize("device", DEVICES)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16), steps=st.integers(1, 3))
def test_adamw(device, shape, dtype, seed, steps):
    p, g = inputs(device, dtype, seed, shape, shape)

    def run():
        params = {"w": p.copy(), "b": p[0, 0].copy()}  # one that decays and one that does not
        optimizer = optim.AdamW(params, lr=0.1)
        for _ in range(steps):
            optimizer.step({"w": g.copy(), "b": g[0, 0].copy()})
        return params["w"], params["b"], optimizer.m["w"], optimizer.v["w"], optimizer.m["b"], optimizer.v["b"]

    assert_paths_agree(run, dtype)


def test_the_paths_differ_where_they_should():
    """The plain and fused runs really take different code (else the tests above compare a path with itself)."""
    x = numpy.linspace(-3, 3, 7)
    with mock.patch.object(gelu, "forward_fused", wraps=gelu.forward_fused) as fused:
        both_paths(forward_and_backward(gelu, x, x))
    assert fused.call_count == 1
    assert not backend.fusing(numpy.ones(3))  # without forcing, host arrays take the plain path
    with backend.fused_kernels(False):
        with backend.fused_kernels(True):
            assert backend._fusion["enabled"]
        assert not backend._fusion["enabled"]
    assert backend._fusion["enabled"]
