"""The CuPy path, checked as far as it can be without a GPU: every CuPy name the code reaches exists, and every
fused kernel compiles.

Names. The package's source is read (ast) for attribute chains rooted at the array module: the names `xp` and
`cupy`, any `.xp` attribute (model.xp, rng.xp), calls of get_array_module / array_module, local aliases of such
chains (`random = self.xp.random`) and `from cupy... import` names; calls of RNG._draws() are rooted at
cupy.random.Generator. Each chain must resolve in the installed CuPy. Where a chain is called, the keywords it
is passed (and the number of positional arguments) must bind to the callee's signature when inspect can read
one; CuPy's ufuncs have none, so their keywords are checked against the arguments that ufunc.__call__'s
docstring lists; other Cython functions and classes without a signature are checked for presence only.
Not covered: methods called on arrays (x.sum(axis=...)) and on objects the code gets back from a CuPy call
other than a class or RNG._draws(), as their type is known only at run time.

Kernels. Each function that backend.fuse compiles is traced by cupy.fuse's own tracer (on arrays that have a
dtype and a shape but no memory), the CUDA source CuPy would generate for it is built, and nvcc compiles it to
PTX for compute capability 9.0 with the include paths and options CuPy uses. At run time CuPy compiles the same
source with NVRTC, which ships with CuPy's CUDA wheels, not with every toolkit: nvcc is the same front end.

What this proves: no AttributeError or TypeError from a missing CuPy name or an unknown keyword on these
paths, and fused kernels whose generated source is valid CUDA C++. What only a GPU can show: the numbers
(tests/test_gpu.py compares them with NumPy's), that the kernels launch (the launch configuration, the
arguments' real shapes and strides), memory use, NCCL's collectives, and speed.

Each test skips, with its reason, where CuPy (or nvcc) is not installed.
"""

import ast
import functools
import importlib
import inspect
import pathlib
import re
import shutil

import numpy
import pytest

import minillm
from minillm import backend
from minillm.fast import adamw, attention, gelu, layernorm, softmax

cupy = pytest.importorskip("cupy", reason="CuPy is not installed: nothing to check the CuPy path against")

PACKAGE = pathlib.Path(minillm.__file__).parent
ROOT_NAMES = {"xp", "cupy"}
CALLED = "()"  # a chain step: the result of calling what precedes it
ROOT_CALLS = {"get_array_module": (), "array_module": (), "_draws": ("random", "Generator", CALLED)}


def chain(node, aliases):
    """The CuPy attribute path that node's expression stands for, or None when it is not rooted at CuPy."""
    if isinstance(node, ast.Name):
        return () if node.id in ROOT_NAMES else aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        if node.attr == "xp":
            return ()
        base = chain(node.value, aliases)
        return None if base is None else base + (node.attr,)
    if isinstance(node, ast.Call):
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        if name in ROOT_CALLS:
            return ROOT_CALLS[name]
        base = chain(node.func, aliases)
        return base + (CALLED,) if base else None
    return None


def scope_aliases(scope):
    """Names bound in scope to a CuPy path: `random = self.xp.random`, `from cupy.cuda import nccl`."""
    aliases = {}
    for node in ast.walk(scope):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cupy":
            prefix = tuple(node.module.split(".")[1:])
            aliases.update({a.asname or a.name: prefix + (a.name,) for a in node.names})
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            path = chain(node.value, aliases)
            if path and node.targets[0].id not in ROOT_NAMES:
                aliases[node.targets[0].id] = path
    return aliases


def cupy_uses():
    """{path: [(file:line, positional count or None, keywords), ...]} for every CuPy chain in the package."""
    uses = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(file.read_text(), str(file))
        where = str(file.relative_to(PACKAGE.parent))
        for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            aliases = scope_aliases(scope)
            for node in ast.walk(scope):
                if isinstance(node, ast.Attribute) and (path := chain(node, aliases)):
                    uses.setdefault(path, [])
                if isinstance(node, ast.Call) and (path := chain(node.func, aliases)):
                    starred = any(isinstance(a, ast.Starred) for a in node.args) or any(
                        k.arg is None for k in node.keywords)
                    call = (f"{where}:{node.lineno}", None if starred else len(node.args),
                            tuple(k.arg for k in node.keywords if k.arg is not None))
                    uses.setdefault(path, []).append(call)
    return uses


USES = cupy_uses()


def resolve(path):
    """The CuPy object at path (importing submodules on the way; a method of an instance comes bound), or None
    where the path goes through a call's result that only a run would show: what a function returns, or an
    instance of a class that CuPy takes from NumPy (finfo), which behaves as on the CPU."""
    obj = cupy
    for i, step in enumerate(path):
        if step == CALLED:
            if not (isinstance(obj, type) and obj.__module__.startswith("cupy")):
                return None
            continue
        if not hasattr(obj, step) and inspect.ismodule(obj):
            importlib.import_module(f"{obj.__name__}.{step}")  # a submodule that is not imported by its parent
        owner, obj = obj, getattr(obj, step)
        if i > 0 and path[i - 1] == CALLED and callable(obj) and not isinstance(
                inspect.getattr_static(owner, step), (staticmethod, classmethod, type)):
            obj = functools.partial(obj, None)  # called on an instance: self is bound
    return obj


def ufunc_keywords():
    """The keyword arguments that CuPy documents for calling a ufunc (its __call__ has no signature)."""
    doc = type(cupy.exp).__call__.__doc__
    return set(re.findall(r"^ {4}(\w+)(?: \(.*\))?:", doc, re.M)) - {"args"}


def test_the_package_reaches_cupy_through_the_names_this_test_reads():
    # The analysis has gone blind if it finds nothing where the code is known to use CuPy.
    assert {("exp",), ("random", "default_rng"), ("random", "Philox4x3210"), ("fuse",),
            ("cuda", "Device"), ("random", "Generator", CALLED, "standard_normal")} <= set(USES)


@pytest.mark.parametrize("path", sorted(USES), ids=".".join)
def test_every_cupy_name_the_code_reaches_exists_with_a_compatible_signature(path):
    if path[:2] == ("cuda", "nccl") and not resolve(path[:2]).available:
        pytest.skip("NCCL is not installed: without it cupy.cuda.nccl is an empty stand-in")
    try:
        obj = resolve(path)
    except (AttributeError, ImportError) as missing:
        pytest.fail(f"cupy.{'.'.join(path)} (used at {USES[path] or 'an attribute read'}): {missing}")
    if obj is None or not USES[path]:
        return
    if isinstance(obj, type(cupy.exp)):
        allowed = ufunc_keywords()
        for where, _, keywords in USES[path]:
            assert set(keywords) <= allowed, f"{where}: cupy.{'.'.join(path)} takes no {set(keywords) - allowed}"
        return
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a Cython function or class without a signature: its presence is the check
        return
    for where, positional, keywords in USES[path]:
        arguments = dict.fromkeys(keywords)
        try:
            if positional is None:
                signature.bind_partial(**arguments)
            else:
                signature.bind(*[None] * positional, **arguments)
        except TypeError as wrong:
            pytest.fail(f"{where}: cupy.{'.'.join(path)}{signature}: {wrong}")


def fake_array(dtype, ndim):
    """A CuPy array that has a dtype and a shape but no memory: enough for cupy.fuse's tracer, no GPU needed."""
    nowhere = cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, 0), 0)
    return cupy.ndarray((1,) * ndim, dtype, memptr=nowhere)


def fused_source(function, args):
    """The CUDA source that cupy.fuse generates for function on args: its own steps up to the launch.

    cupy.fuse's first call traces the function (with its thread-local history set), builds an
    ElementwiseKernel, and at launch generates its code from each argument's kind, dtype and ndim; the launch
    itself asks the driver for the device, so the code is generated here from the same parts.
    """
    from cupy._core import _carray, _kernel, _scalar, fusion

    history = fusion._FusionHistory()
    fusion._thread_local.history, fusion._thread_local.is_old_fusing = history, True
    try:
        kernel, reduction = history.get_fusion(function, args, function.__name__)
    finally:
        fusion._thread_local.history, fusion._thread_local.is_old_fusing = None, False
    assert isinstance(kernel, _kernel.ElementwiseKernel) and reduction == {}
    ndim = max(a.ndim for a in args if isinstance(a, cupy.ndarray))
    in_types = tuple(a.dtype.type if isinstance(a, cupy.ndarray) else None for a in args)
    _, out_types, type_map = kernel._decide_params_type(in_types, ())
    array, indexer, scalar = 1, 2, 3  # CuPy's _ArgKind
    infos = [_kernel._ArgInfo(array, cupy.ndarray, a.dtype.type, ndim, True, True) if isinstance(a, cupy.ndarray)
             else _kernel._ArgInfo(scalar, _scalar.CScalar, numpy.dtype(type(a)).type, 0, True, True) for a in args]
    infos += [_kernel._ArgInfo(array, cupy.ndarray, t, ndim, True, True) for t in out_types]
    infos.append(_kernel._ArgInfo(indexer, _carray.Indexer, None, ndim, True, True))
    return _kernel._get_elementwise_kernel_code(
        tuple(infos), type_map, kernel.params, kernel.operation, kernel.name, kernel.preamble)


# Every backend.fuse kernel, with arguments of the kinds and ndims its caller passes (Python floats stay scalars).
FUSED = {
    "adamw_update_fused": (adamw.adamw_update_fused, lambda a: (a(2), a(2), a(2), a(2)) + (0.9,) * 8),
    "attention.scale_and_mask_fused": (attention.scale_and_mask_fused, lambda a: (a(4), 0.5, a(2))),
    "gelu.forward_fused": (gelu.forward_fused, lambda a: (a(3),)),
    "gelu.backward_fused": (gelu.backward_fused, lambda a: (a(3), a(3), a(3))),
    "layernorm.normalize_fused": (layernorm.normalize_fused, lambda a: (a(3), a(3), a(1), a(1))),
    "layernorm.input_grad_fused": (layernorm.input_grad_fused, lambda a: (a(3), a(3), a(3), a(3), a(3))),
    "softmax.exp_shifted_fused": (softmax.exp_shifted_fused, lambda a: (a(4), a(4))),
    "softmax.input_grad_fused": (softmax.input_grad_fused, lambda a: (a(4), a(4), a(4))),
}


def test_every_fused_kernel_is_listed():
    made_by_fuse = backend.fuse.__qualname__ + ".<locals>.call"
    fused = {n for m in (adamw, attention, gelu, layernorm, softmax) for n, f in vars(m).items()
             if getattr(getattr(f, "__code__", None), "co_qualname", "") == made_by_fuse}
    assert {name.split(".")[-1] for name in FUSED} == fused


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_every_fused_kernel_compiles(name, dtype):
    from cupy._core import core
    from cupy.cuda import compiler

    function, arguments = FUSED[name]
    source = fused_source(function.__wrapped__, arguments(lambda ndim: fake_array(dtype, ndim)))
    assert f'__global__ void {function.__name__}(' in source
    headers = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)  # what core.compile_with_cache prepends
    options = core.assemble_cupy_compiler_options(()) + ("-ftz=true",)
    ptx = compiler.compile_using_nvcc(headers + source, options, arch="90", code_type="ptx")
    assert f".entry {function.__name__}(" in ptx.decode()
