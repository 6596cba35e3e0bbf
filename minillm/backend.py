"""The one place that knows whether arrays live on the CPU (NumPy) or a CUDA GPU (CuPy).

Array code never imports numpy or cupy itself. It asks this module for the
array module, in one of two ways:

    xp = backend.get_array_module(x)   # layers: compute where the inputs live
    xp = backend.array_module(device)  # code that creates arrays from nothing

NumPy and CuPy share one API, so the same lines run on both. Copies between
host and device happen only at the edges (I/O, printing, checkpoints), through
`to_host`, `to_device` and `to_float`.

On a GPU each array operation is a kernel launch and a full pass through memory.
A few layers therefore also write their chains of elementwise operations as one
function that `fuse` compiles into a single kernel (cupy.fuse). `fusing(x)` says
when a layer takes that path: for GPU arrays, unless `fused_kernels(False)` turned
it off. On the CPU the plain array code runs, and it is the reference that the
fused versions are tested against.
"""

import contextlib
import functools
import importlib.util

import numpy

DEVICES = ("cpu", "cuda", "auto")


class BackendError(RuntimeError):
    """The requested device cannot be used on this machine."""


def _import_cupy():
    """Return the cupy module when it is installed and sees a GPU, else None."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # CuPy installed without a usable driver or GPU
        return None
    return cupy


def cuda_available():
    return _import_cupy() is not None


def auto_missed_a_gpu(device_asked, device_used):
    """Whether --device auto settled for the CPU although CuPy is installed: worth a note, as a GPU was expected."""
    return device_asked == "auto" and device_used == "cpu" and importlib.util.find_spec("cupy") is not None


def resolve_device(device="auto"):
    """Map 'cpu' | 'cuda' | 'auto' to the concrete device, 'cpu' or 'cuda'.

    'auto' picks CUDA when CuPy is installed and a GPU is present, else the CPU.
    'cuda' without CuPy or a GPU fails at once rather than later, deep inside.
    """
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if device == "auto":
        return "cpu"
    raise BackendError(
        "--device cuda needs CuPy and a CUDA GPU: install with "
        "pip install -e \".[gpu]\" (CuPy for CUDA 13; \".[gpu-cuda12]\" for CUDA 12, see nvidia-smi) "
        "or use --device cpu"
    )


def array_module(device):
    """The array module (numpy or cupy) for a concrete device name."""
    if device == "cpu":
        return numpy
    cupy = _import_cupy()
    if cupy is None:
        raise BackendError(f"device {device!r} is not available on this machine")
    return cupy


def get_array_module(*arrays):
    """numpy, or cupy when any of the arrays lives on the GPU."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return numpy


_fusion = {"enabled": True}


def fusing(*arrays):
    """True when the arrays live on a GPU and fused kernels are on (the default)."""
    return _fusion["enabled"] and get_array_module(*arrays) is not numpy


@contextlib.contextmanager
def fused_kernels(enabled):
    """Within the block, GPU arrays take the fused kernels (True) or the plain array code (False)."""
    before, _fusion["enabled"] = _fusion["enabled"], enabled
    try:
        yield
    finally:
        _fusion["enabled"] = before


def fuse(function):
    """`function`, compiled by cupy.fuse into one GPU kernel when called with CuPy arrays.

    With NumPy arrays the function itself runs, line by line: the same body is
    then ordinary array code, and the tests check it on the CPU. The body may use
    elementwise operations only, taking its array module from get_array_module.
    Arithmetic between two scalar arguments is not done in the arrays' precision
    on the GPU (CuPy 14's cupy.fuse does it in float16): pass such values
    ready-made, as optim.py passes 1 - beta1 rather than beta1 alone.
    """
    compiled = None

    @functools.wraps(function)
    def call(*args):
        nonlocal compiled
        if get_array_module(*args) is numpy:
            return function(*args)
        if compiled is None:  # the first GPU call: CuPy is imported only now
            import cupy

            compiled = cupy.fuse(kernel_name=function.__name__)(function)
        return compiled(*args)

    return call


def device_of(array):
    return "cpu" if get_array_module(array) is numpy else "cuda"


def to_host(array):
    """A NumPy copy (or the array itself when it is already on the host)."""
    if get_array_module(array) is numpy:
        return numpy.asarray(array)
    return array.get()


def to_float(array):
    """A 0-d array as a Python float. On a GPU this waits for all queued work: call it only where a
    value is needed on the host (a log line, a decision), never once per step without need."""
    return float(to_host(array))


def to_device(array, device):
    """The array on `device`, copied only when it is not there already."""
    return array_module(device).asarray(array)


def synchronize(device):
    """Wait until the device has finished its queued work (a GPU runs asynchronously); no-op on the CPU.

    Read a clock only after this, or a timing measures the queueing, not the work.
    """
    if device != "cpu":
        array_module(device).cuda.Device().synchronize()


def dtype_of(name):
    """numpy.dtype for 'float32' | 'float64' (the dtypes every layer supports)."""
    if name not in ("float32", "float64"):
        raise BackendError(f"unsupported dtype {name!r}: choose float32 or float64")
    return numpy.dtype(name)


class RNG:
    """A seeded random generator that draws on the device where the arrays live.

    Dropout masks are drawn here, on the device, so a training step never waits
    on a host-to-device copy of random numbers. The generator is set up at the
    first draw: a step without dropout, which still makes one, pays nothing.
    On a GPU it is Philox, a counter-based generator: cuRAND starts each of its
    parallel streams in constant time, where the streams of XORWOW (CuPy's
    default) are found by skipping ahead along one sequence, and training makes
    a fresh generator for every step.
    """

    def __init__(self, seed, device="cpu"):
        self.seed = seed
        self.device = device
        self.xp = array_module(device)
        self._generator = None

    def _draws(self):
        if self._generator is None:
            random = self.xp.random
            self._generator = random.default_rng(self.seed if self.xp is numpy else random.Philox4x3210(self.seed))
        return self._generator

    def uniform(self, shape, dtype):
        """Samples of U[0, 1) with the given shape and dtype."""
        return self._draws().random(size=shape, dtype=dtype)

    def normal(self, shape, std, dtype):
        """Samples of N(0, std^2) with the given shape and dtype."""
        sample = self._draws().standard_normal(size=shape, dtype=dtype)
        sample *= std
        return sample
