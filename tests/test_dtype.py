"""float32 stays float32: a whole training step (forward, backward, clipping, AdamW) makes no float64 array."""

import numpy
import pytest

from minillm import backend
from minillm.layers import attention, cross_entropy, dropout, embedding, gelu, layernorm, linear, mlp, softmax
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW, clip_grad_norm


def arrays_in(obj):
    """Every NumPy array or scalar reachable through tuples, lists and dicts."""
    if isinstance(obj, (numpy.ndarray, numpy.generic)):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from arrays_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from arrays_in(item)


def float_dtypes(obj):
    return {a.dtype for a in arrays_in(obj) if a.dtype.kind == "f"}


def test_a_float32_training_step_creates_no_float64():
    config = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
    model = GPT(config, seed=0, dtype="float32")
    optimizer = AdamW(model.params, lr=1e-3)
    idx = numpy.random.default_rng(0).integers(0, 13, (3, 8))
    targets = idx.copy()
    targets[0, :3] = cross_entropy.IGNORE_INDEX
    logits, loss = model(idx, targets)
    grads = model.backward()
    norm = clip_grad_norm(grads, 0.5)
    optimizer.step(grads)
    found = float_dtypes([logits, loss, grads, norm, model.params, optimizer.m, optimizer.v, model._cache])
    assert found == {numpy.dtype("float32")}

    kv_cache = model.new_kv_cache(3)
    assert float_dtypes(model.decode(idx, kv_cache)) == {numpy.dtype("float32")}


def float32_case(name):
    """(forward, inputs, backward) of one layer on float32 inputs."""
    rng = numpy.random.default_rng(0)
    f32 = lambda *shape: rng.normal(size=shape).astype(numpy.float32)
    x = f32(2, 3, 8)
    cases = {
        "linear": (linear.forward, (x, f32(8, 5), f32(5))),
        "layernorm": (layernorm.forward, (x, f32(8), f32(8))),
        "gelu": (gelu.forward, (x,)),
        "softmax": (softmax.forward, (x,)),
        "dropout": (lambda x: dropout.forward(x, 0.3, backend.RNG(0)), (x,)),
        "mlp": (mlp.forward, (x, f32(8, 32), f32(32), f32(32, 8), f32(8))),
        "attention": (lambda *a: attention.forward(*a, 2, 0.2, backend.RNG(0)), (x, f32(8, 24), f32(24), f32(8, 8), f32(8))),
        "embedding": (embedding.forward, (rng.integers(0, 5, (2, 3)), f32(5, 8), f32(4, 8))),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["linear", "layernorm", "gelu", "softmax", "dropout", "mlp", "attention", "embedding"])
def test_each_layer_keeps_float32(name):
    forward, inputs = float32_case(name)
    out, cache = forward(*inputs)
    grads = {"linear": linear, "layernorm": layernorm, "gelu": gelu, "softmax": softmax, "dropout": dropout,
             "mlp": mlp, "attention": attention, "embedding": embedding}[name].backward(numpy.ones_like(out), cache)
    assert float_dtypes([out, cache, grads]) == {numpy.dtype("float32")}


def test_cross_entropy_keeps_float32():
    logits = numpy.random.default_rng(0).normal(size=(2, 3, 7)).astype(numpy.float32)
    loss, cache = cross_entropy.forward(logits, numpy.array([[1, 2, -1], [0, 6, 3]]))
    assert float_dtypes([loss, cache, cross_entropy.backward(1.0, cache)]) == {numpy.dtype("float32")}
