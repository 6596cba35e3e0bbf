"""The backend: device choice, seeded device RNG, host transfers; CuPy gives NumPy's results where a GPU is
present; and array code takes its array module from the backend, never importing numpy or cupy itself."""

import ast
from pathlib import Path

import numpy
import pytest

from minillm import backend
from minillm.layers import attention, layernorm, mlp
from minillm.model import GPT, GPTConfig

PACKAGE = Path(__file__).resolve().parent.parent / "minillm"
# Array code: these files must reach NumPy or CuPy only through minillm.backend.
ARRAY_CODE = sorted(PACKAGE.glob("layers/*.py")) + [PACKAGE / "model.py", PACKAGE / "optim.py", PACKAGE / "sampling.py"]


@pytest.mark.parametrize("path", ARRAY_CODE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_array_code_does_not_import_numpy_or_cupy(path):
    offenders = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        offenders += [f"line {node.lineno}: {name}" for name in names if name.split(".")[0] in ("numpy", "cupy")]
    assert not offenders, f"{path.name} imports an array library directly: {offenders}"


def test_device_choice(monkeypatch):
    assert backend.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    assert backend.resolve_device("auto") == "cpu"
    with pytest.raises(backend.BackendError, match="CuPy"):
        backend.resolve_device("cuda")
    with pytest.raises(backend.BackendError, match="cpu, cuda, auto"):
        backend.resolve_device("tpu")


def test_rng_is_seeded_and_keeps_the_dtype():
    a, b = backend.RNG(7), backend.RNG(7)
    first = a.uniform((3, 4), numpy.float32)
    assert first.dtype == numpy.float32 and numpy.array_equal(first, b.uniform((3, 4), numpy.float32))
    normal = a.normal((1000,), 0.5, numpy.float64)
    assert normal.dtype == numpy.float64 and abs(normal.std() - 0.5) < 0.05
    assert not numpy.array_equal(backend.RNG(8).uniform((3, 4), numpy.float32), first)


def test_host_transfers_round_trip():
    x = numpy.arange(6.0).reshape(2, 3)
    assert backend.to_host(x) is x
    assert numpy.array_equal(backend.to_host(backend.to_device(x, "cpu")), x)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not backend.cuda_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    return request.param


def relative_error(a, b):
    a, b = backend.to_host(a), backend.to_host(b)
    return float(numpy.abs(a - b).max() / numpy.abs(b).max())


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("float64", 1e-10)])
def test_layers_on_the_device_match_numpy(device, dtype, tolerance):
    rng = numpy.random.default_rng(0)
    host = lambda *shape: rng.normal(size=shape).astype(dtype)
    x, C = host(2, 5, 8), 8
    cases = [
        (layernorm, (x, host(C), host(C)), ()),
        (mlp, (x, host(C, 4 * C), host(4 * C), host(4 * C, C), host(C)), ()),
        (attention, (x, host(C, 3 * C), host(3 * C), host(C, C), host(C)), (2,)),
    ]
    for layer, inputs, options in cases:
        out, cache = layer.forward(*inputs, *options)
        grads = layer.backward(out, cache)
        on_device = [backend.to_device(a, device) for a in inputs]
        out_d, cache_d = layer.forward(*on_device, *options)
        grads_d = layer.backward(out_d, cache_d)
        assert relative_error(out_d, out) < tolerance
        for g_d, g in zip(grads_d, grads):
            assert relative_error(g_d, g) < tolerance


def test_a_model_step_on_the_device_matches_numpy(device):
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    cpu_model = GPT(config, seed=0, dtype="float64")
    model = GPT(config, seed=0, dtype="float64", device=device)
    for name, p in cpu_model.params.items():
        model.params[name][...] = backend.to_device(p, device)
    idx = numpy.random.default_rng(0).integers(0, 11, (2, 6))
    _, loss = model(idx, idx)
    _, cpu_loss = cpu_model(idx, idx)
    assert abs(float(loss) - float(cpu_loss)) < 1e-10
    grads, cpu_grads = model.backward(), cpu_model.backward()
    for name in cpu_grads:
        assert relative_error(grads[name], cpu_grads[name]) < 1e-10, name
