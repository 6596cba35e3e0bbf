"""float32 stays float32: a training step (forward with dropout, backward, clipping, AdamW) makes no float64 array.

Every floating array reachable from the logits, the loss, the gradients, the
parameters, the optimizer moments and the model's forward cache must be float32,
and so must every layer's outputs, caches and gradients on float32 inputs, in the
reference layers (minillm.layers) and the fast ones (minillm.fast) alike. A
stray float64 (a NumPy scalar, an upcast by a float64 constant) would double the
memory and halve the speed of training without any visible error.
"""

import numpy
import pytest

import minillm.fast
import minillm.layers
from minillm import backend
from minillm.layers import cross_entropy
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW, clip_grad_norm

F32 = numpy.dtype("float32")


def arrays_in(obj):
    """Every NumPy array or NumPy scalar reachable through tuples, lists and dicts."""
    if isinstance(obj, (numpy.ndarray, numpy.generic)):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from arrays_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from arrays_in(item)


def assert_float32_only(obj, what, at_least=1):
    arrays = list(arrays_in(obj))
    floats = [a for a in arrays if a.dtype.kind in "fc"]
    assert len(floats) >= at_least, f"{what}: expected >= {at_least} float arrays, found {len(floats)}"
    wrong = sorted({str(a.dtype) for a in floats if a.dtype != F32})
    assert not wrong, f"{what}: float arrays of dtype {wrong}"
    assert all(a.dtype.kind in "fcbiu" for a in arrays), f"{what}: unexpected dtypes"


def test_a_float32_training_step_creates_no_float64():
    config = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.2)
    model = GPT(config, seed=0, dtype="float32").train()
    optimizer = AdamW(model.params, lr=1e-3, weight_decay=0.1)
    rng = numpy.random.default_rng(0)
    idx, targets = rng.integers(0, 13, (3, 8)), rng.integers(0, 13, (3, 8))
    targets[0, :3] = cross_entropy.IGNORE_INDEX
    logits, loss = model(idx, targets)
    # Dropout masks, LayerNorm statistics, attention weights, softmax probabilities ...
    # (checked before backward, which frees them as it goes)
    assert_float32_only(model._cache, "the forward cache", at_least=20)
    grads = model.backward()
    norm = clip_grad_norm(grads, 0.1)
    optimizer.step(grads)

    assert_float32_only(logits, "logits")
    assert_float32_only(loss, "loss")
    assert_float32_only(norm, "clip_grad_norm's norm")
    assert_float32_only(grads, "gradients", at_least=len(model.params))
    assert_float32_only(model.params, "parameters", at_least=len(model.params))
    assert_float32_only([optimizer.m, optimizer.v], "AdamW moments", at_least=2 * len(model.params))
    assert_float32_only(model.decode(idx[:, :4], model.new_kv_cache(3)), "decode's logits")


def f32(rng, *shape):
    return rng.normal(size=shape).astype(numpy.float32)


def layer_case(name, rng, L):
    """(forward, inputs, backward) of package L's layer on float32 inputs; dropout on wherever a layer has it."""
    x = f32(rng, 2, 3, 8)
    return {
        "linear": (L.linear.forward, (x, f32(rng, 8, 5), f32(rng, 5)), L.linear.backward),
        "layernorm": (L.layernorm.forward, (x, f32(rng, 8), f32(rng, 8)), L.layernorm.backward),
        "gelu": (L.gelu.forward, (x,), L.gelu.backward),
        "softmax": (L.softmax.forward, (x,), L.softmax.backward),
        "dropout": (lambda x: L.dropout.forward(x, 0.3, backend.RNG(0)), (x,), L.dropout.backward),
        "mlp": (L.mlp.forward, (x, f32(rng, 8, 32), f32(rng, 32), f32(rng, 32, 8), f32(rng, 8)), L.mlp.backward),
        "attention": (lambda *a: L.attention.forward(*a, 2, 0.2, backend.RNG(0)),
                      (x, f32(rng, 8, 24), f32(rng, 24), f32(rng, 8, 8), f32(rng, 8)), L.attention.backward),
        "embedding": (L.embedding.forward, (rng.integers(0, 5, (2, 3)), f32(rng, 5, 8), f32(rng, 4, 8)),
                      L.embedding.backward),
        "cross_entropy": (lambda z: L.cross_entropy.forward(z, numpy.array([[1, 2, -1], [0, 7, 3]])), (x,),
                          lambda dloss, cache: L.cross_entropy.backward(1.0, cache)),
        "lora": (lambda *a: L.lora.forward(*a, 2.0), (f32(rng, 8, 5), f32(rng, 8, 2), f32(rng, 2, 5)),
                 L.lora.backward),
    }[name]


@pytest.mark.parametrize("package", [minillm.layers, minillm.fast], ids=["reference", "fast"])
@pytest.mark.parametrize("name", ["linear", "layernorm", "gelu", "softmax", "dropout", "mlp", "attention",
                                  "embedding", "cross_entropy", "lora"])
def test_each_layer_keeps_float32(name, package):
    forward, inputs, backward = layer_case(name, numpy.random.default_rng(0), package)
    out, cache = forward(*inputs)
    grads = backward(numpy.ones_like(out), cache)
    assert_float32_only(out, f"{name} output")
    assert_float32_only(cache, f"{name} cache", at_least=0)  # embedding keeps only ids and shapes
    assert_float32_only(grads, f"{name} gradients")


@pytest.mark.parametrize("package", [minillm.layers, minillm.fast], ids=["reference", "fast"])
def test_kv_cache_decoding_keeps_float32(package):
    rng = numpy.random.default_rng(0)
    x, weights = f32(rng, 2, 3, 8), (f32(rng, 8, 24), f32(rng, 24), f32(rng, 8, 8), f32(rng, 8))
    kv_cache = package.attention.KVCache(2, 2, 4, 4, numpy.float32, numpy)
    outs = [package.attention.forward(x[:, a:b], *weights, 2, kv_cache=kv_cache)[0] for a, b in ((0, 2), (2, 3))]
    assert_float32_only([outs, kv_cache.k, kv_cache.v], "decoded outputs and the key/value cache", at_least=4)
