"""The backend: device choice, the seeded device RNG, host transfers, CuPy results equal to NumPy's,
and the structural rule that array code takes its array module from minillm.backend, never importing
numpy or cupy itself.

The "cuda" cases of `xp_device` (conftest.py) run only where CuPy sees a GPU.
"""

import ast
from pathlib import Path

import numpy
import pytest

from minillm import backend
from minillm.layers import attention, cross_entropy, embedding, gelu, layernorm, linear, mlp, softmax
from minillm.model import GPT, GPTConfig

PACKAGE = Path(backend.__file__).resolve().parent
ARRAY_CODE = sorted(PACKAGE.glob("layers/*.py")) + [PACKAGE / name for name in ("model.py", "optim.py", "sampling.py")]
ARRAY_LIBRARIES = ("numpy", "cupy")


def direct_array_imports(source):
    """[(line, imported name)] for every import of numpy or cupy (or their submodules), at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in ARRAY_LIBRARIES]
    return found


def test_the_import_detector_sees_every_form():
    source = "import os\nimport numpy as np\nfrom cupy import asarray\ndef f():\n    import numpy.linalg\n"
    assert direct_array_imports(source) == [(2, "numpy"), (3, "cupy"), (5, "numpy.linalg")]
    assert direct_array_imports("from minillm.backend import get_array_module\nimport numbers\n") == []


@pytest.mark.parametrize("path", ARRAY_CODE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_array_code_does_not_import_numpy_or_cupy(path):
    offenders = direct_array_imports(path.read_text())
    where = ", ".join(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for line, name in offenders)
    assert not offenders, f"array code must get its array module from minillm.backend: {where}"


def test_array_code_list_is_not_empty():
    assert len(ARRAY_CODE) >= 11 and all(p.exists() for p in ARRAY_CODE)


def test_device_resolution(monkeypatch):
    assert backend.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    assert backend.resolve_device("auto") == "cpu"
    with pytest.raises(backend.BackendError, match="CuPy"):
        backend.resolve_device("cuda")
    for unknown in ("tpu", "CPU", "", None):
        with pytest.raises(backend.BackendError, match="unknown device"):
            backend.resolve_device(unknown)


def test_array_module_and_dtype_checks(monkeypatch):
    assert backend.array_module("cpu") is numpy
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)
    with pytest.raises(backend.BackendError):
        backend.array_module("cuda")
    assert backend.dtype_of("float32") == numpy.float32 and backend.dtype_of("float64") == numpy.float64
    with pytest.raises(backend.BackendError):
        backend.dtype_of("float16")


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_rng_is_reproducible_and_keeps_the_dtype(xp_device, dtype):
    a, b = backend.RNG(7, xp_device), backend.RNG(7, xp_device)
    for draw in (lambda r: r.uniform((3, 4), dtype), lambda r: r.normal((3, 4), 0.5, dtype)):
        first, second = backend.to_host(draw(a)), backend.to_host(draw(b))
        assert first.dtype == dtype and first.shape == (3, 4)
        numpy.testing.assert_array_equal(first, second)
    assert not numpy.array_equal(backend.to_host(backend.RNG(8, xp_device).uniform((3, 4), dtype)),
                                 backend.to_host(backend.RNG(7, xp_device).uniform((3, 4), dtype)))
    u = backend.to_host(a.uniform((100_000,), dtype))
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 5 * (1 / 12) ** 0.5 / 100_000**0.5
    normal = backend.to_host(a.normal((100_000,), 0.5, dtype))
    assert abs(normal.std() - 0.5) < 5 * 0.5 / (2 * 100_000) ** 0.5  # std's standard error: s / sqrt(2n)


def test_host_device_round_trip(xp_device):
    x = numpy.arange(12.0).reshape(3, 4)
    assert backend.to_host(x) is x
    on_device = backend.to_device(x, xp_device)
    assert backend.device_of(on_device) == xp_device
    assert backend.get_array_module(on_device) is backend.array_module(xp_device)
    back = backend.to_host(on_device)
    assert isinstance(back, numpy.ndarray) and back.dtype == x.dtype
    numpy.testing.assert_array_equal(back, x)


def relative_error(a, b):
    a, b = backend.to_host(a), backend.to_host(b)
    return float(numpy.abs(a - b).max() / max(numpy.abs(b).max(), 1e-300))


def layer_cases(rng):
    """(name, forward, inputs, backward): float64 inputs on the host; no dropout, so no RNG stream to match."""
    x = rng.normal(size=(2, 5, 8))
    w = lambda *shape: rng.normal(size=shape)
    return [
        ("linear", linear.forward, (x, w(8, 5), w(5)), linear.backward),
        ("layernorm", layernorm.forward, (x, w(8), w(8)), layernorm.backward),
        ("gelu", gelu.forward, (x,), gelu.backward),
        ("softmax", softmax.forward, (x,), softmax.backward),
        ("mlp", mlp.forward, (x, w(8, 32), w(32), w(32, 8), w(8)), mlp.backward),
        ("attention", lambda *a: attention.forward(*a, 2), (x, w(8, 24), w(24), w(8, 8), w(8)), attention.backward),
        ("embedding", embedding.forward, (rng.integers(0, 5, (2, 5)), w(5, 8), w(6, 8)), embedding.backward),
        ("cross_entropy", lambda z, y: cross_entropy.forward(z, y), (w(2, 5, 7), numpy.array([[1, 2, -1, 0, 6]] * 2)),
         lambda dloss, cache: (cross_entropy.backward(1.0, cache),)),
    ]


@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in layer_cases(numpy.random.default_rng(0))])
def test_layers_on_the_device_match_numpy(xp_device, case):
    name, forward, inputs, backward = layer_cases(numpy.random.default_rng(0))[case]
    R = numpy.random.default_rng(1)
    out, cache = forward(*inputs)
    dout = R.normal(size=out.shape)
    grads = backward(dout, cache)
    out_d, cache_d = forward(*(backend.to_device(a, xp_device) for a in inputs))
    assert backend.device_of(out_d) == xp_device
    grads_d = backward(backend.to_device(dout, xp_device), cache_d)
    assert relative_error(out_d, out) < 1e-10, name
    grads, grads_d = [g for g in grads if g is not None], [g for g in grads_d if g is not None]
    assert len(grads_d) == len(grads) >= 1
    for g_d, g in zip(grads_d, grads):
        assert backend.device_of(g_d) == xp_device and relative_error(g_d, g) < 1e-10, name


def test_a_model_step_on_the_device_matches_numpy(xp_device):
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    cpu_model = GPT(config, seed=0, dtype="float64")
    model = GPT(config, seed=0, dtype="float64", device=xp_device)
    for name, p in cpu_model.params.items():  # the device RNG's stream differs from NumPy's: copy the weights
        model.params[name][...] = backend.to_device(p, xp_device)
    idx = numpy.random.default_rng(0).integers(0, 11, (2, 6))
    _, loss = model(idx, idx)
    _, cpu_loss = cpu_model(idx, idx)
    assert abs(float(loss) - float(cpu_loss)) < 1e-10 * abs(float(cpu_loss))
    grads, cpu_grads = model.backward(), cpu_model.backward()
    for name in cpu_grads:
        assert relative_error(grads[name], cpu_grads[name]) < 1e-10, name
