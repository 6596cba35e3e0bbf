"""The backend: device choice, the seeded device RNG, host transfers, and the structural rule
that array code (the reference and fast layers, the model, the optimizer, sampling) takes its
array module from minillm.backend, never importing numpy or cupy itself. (CuPy's results
against NumPy's are checked in test_gpu.py.)

The "cuda" cases of `xp_device` (conftest.py) run only where CuPy sees a GPU.
"""

import ast
from pathlib import Path

import numpy
import pytest

from minillm import backend

PACKAGE = Path(backend.__file__).resolve().parent
ARRAY_CODE = (sorted(PACKAGE.glob("layers/*.py")) + sorted(PACKAGE.glob("fast/*.py"))
              + [PACKAGE / name for name in ("model.py", "optim.py", "sampling.py")])
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
    assert len(ARRAY_CODE) >= 20 and all(p.exists() for p in ARRAY_CODE)
    assert {p.parent.name for p in ARRAY_CODE} >= {"layers", "fast"}


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
