"""The fast layers (minillm.fast) give the numbers of the reference layers (minillm.layers).

Each test feeds the same inputs to both readings of a layer and compares the forward
output and every gradient by max |fast - reference| / max |reference|, array by array:
at most 1e-12 in float64 and FLOAT32_TOLERANCE = 1e-4 in float32.

Why 1e-4 in float32: the two readings round differently (BLAS row sums against NumPy's
pairwise sums, products per causal block against one over the whole square, in-place
chains against fresh arrays), each step within a few units of float32's rounding (6e-8),
and the backward passes of LayerNorm, softmax and attention subtract nearly equal terms,
which scales these errors up. The largest errors seen over 500 hypothesis examples a test
(HYPOTHESIS_PROFILE=stress) were 3e-6 in float32 (the MLP) and 7e-15 in float64: 1e-4
leaves a factor 30 and still catches a wrong term, which is off by far more. Inputs are
drawn at moderate scales: where every softmax row is saturated, ds is a difference of
nearly equal terms in either reading; GELU's errors are measured against the size of its
inputs (see test_gelu).

Shapes come from hypothesis, with batch 1, T = 1, one head and odd sizes; attention takes
query_block 1..6 (several blocks, T above and below the block) and the default,
weight_grads True and False, biases or none, and dropout on with two generators seeded
alike. Decoding with a key/value cache in chunks gives the same outputs through both.
The mutation checks at the end make subtly wrong fast functions and assert that the same
comparison catches each.
"""

import ast
import inspect
import types
from pathlib import Path

import numpy
import pytest
from hypothesis import example, given, strategies as st

import minillm.fast as fast
import minillm.layers as layers
from minillm import backend

FLOAT32_TOLERANCE = 1e-4
TOLERANCE = {"float64": 1e-12, "float32": FLOAT32_TOLERANCE}
NAMES = ["attention", "cross_entropy", "dropout", "embedding", "gelu", "layernorm", "linear", "lora", "mlp", "softmax"]
SEED = st.integers(0, 2**32 - 1)
DTYPE = st.sampled_from(["float64", "float32"])
B, T, WIDTH = st.integers(1, 3), st.integers(1, 6), st.integers(1, 9)


def relative_error(got, expected, floor=0.0):
    """max |got - expected| / max |expected|, the denominator at least `floor`."""
    got, expected = backend.to_host(got), backend.to_host(expected)
    scale = max(float(numpy.abs(expected).max(initial=0.0)), floor, 1e-300)
    return float(numpy.abs(got - expected).max(initial=0.0)) / scale


def assert_same_results(got, expected, dtype, floors=None):
    """Results (output and gradients, None where a gradient is not formed) agree within TOLERANCE[dtype]."""
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is None or g is None:
            assert g is None and e is None, f"result {i}: None in one reading only"
            continue
        assert g.shape == e.shape, f"result {i}: shape {g.shape} != {e.shape}"
        assert g.dtype == e.dtype == numpy.dtype(dtype), f"result {i}: dtype {g.dtype}, {e.dtype}"
        error = relative_error(g, e, floors[i] if floors else 0.0)
        assert error <= TOLERANCE[dtype], f"result {i}: relative error {error:.2e} > {TOLERANCE[dtype]}"


def run(package, name, make_args, forward_options=None, backward_options=None, seed=0):
    """([out, *gradients], dout) of package.<name> on make_args() (fresh each time: a generator is consumed)."""
    layer = getattr(package, name)
    out, cache = layer.forward(*make_args(), **(forward_options or {}))
    if numpy.ndim(out):
        dout = numpy.random.default_rng(seed + 1).normal(size=out.shape).astype(out.dtype)
    else:
        dout = 1.7  # a loss: dloss is a number
    grads = layer.backward(dout, cache, **(backward_options or {}))
    return [out, *(grads if isinstance(grads, tuple) else (grads,))], dout


def assert_fast_matches_reference(name, make_args, dtype, fast_options=None, backward_options=None, seed=0,
                                  input_scale=False):
    """The fast layer's output and gradients equal the reference's (fast_options: fast-only keywords).

    input_scale: measure the errors of the output against at least the largest input and those
    of the gradients against at least the largest of dout (for elementwise layers, see test_gelu).
    """
    got, _ = run(fast, name, make_args, fast_options, backward_options, seed)
    expected, dout = run(layers, name, make_args, None, backward_options, seed)
    floors = None
    if input_scale:
        floors = [max(float(numpy.abs(a).max()) for a in make_args())] + [float(numpy.abs(dout).max())] * (len(got) - 1)
    assert_same_results(got, expected, dtype, floors)


def arrays(seed, dtype, *shapes, scale=1.0):
    rng = numpy.random.default_rng(seed)
    return [None if shape is None else (rng.normal(size=shape) * scale).astype(dtype) for shape in shapes]


def weight(seed, dtype, n_in, n_out):
    """Weights ~ N(0, 1 / n_in): activations stay of order 1."""
    return arrays(seed, dtype, (n_in, n_out), scale=n_in**-0.5)[0]


# -------------------------------------------------------------------------- the two packages

def test_the_packages_are_interchangeable():
    for package in (fast, layers):
        assert sorted(package.__all__) == NAMES
        for name in NAMES:
            module = getattr(package, name)
            assert callable(module.forward) and callable(module.backward), f"{package.__name__}.{name}"
    for name in ("dropout", "embedding", "lora"):  # nothing to tune: re-exported
        assert getattr(fast, name) is getattr(layers, name)
    for name in set(NAMES) - {"dropout", "embedding", "lora"}:
        assert getattr(fast, name) is not getattr(layers, name)
    assert fast.layernorm.EPS == layers.layernorm.EPS
    assert fast.cross_entropy.IGNORE_INDEX == layers.cross_entropy.IGNORE_INDEX
    assert fast.attention.QUERY_BLOCK >= 1 and not hasattr(layers.attention, "QUERY_BLOCK")


def test_the_twins_share_every_signature():
    """A function or class that both readings of a layer define takes the same arguments in both, so the two
    read side by side; the fast attention's forward alone adds one trailing keyword, its query_block."""
    extra = {("attention", "forward"): ["query_block"]}
    for name in NAMES:
        reference, tuned = getattr(layers, name), getattr(fast, name)
        defined = lambda module: {attr for attr, value in vars(module).items() if not attr.startswith("_")
                                  and (inspect.isfunction(value) or inspect.isclass(value))
                                  and value.__module__ == module.__name__}
        shared = defined(reference) & defined(tuned) if reference is not tuned else set()
        for attr in shared:
            ours = list(inspect.signature(getattr(reference, attr)).parameters)
            theirs = list(inspect.signature(getattr(tuned, attr)).parameters)
            assert theirs == ours + extra.get((name, attr), []), f"{name}.{attr}: {ours} against {theirs}"
    for cache in (layers.attention.KVCache(1, 1, 4, 2, numpy.float64, numpy),
                  fast.attention.KVCache(1, 1, 4, 2, numpy.float64, numpy)):
        cache.append(numpy.zeros((1, 1, 3, 2)), numpy.zeros((1, 1, 3, 2)))
        assert (cache.length, cache.capacity) == (3, 4) and "length" in vars(cache)


def test_the_reference_has_no_tuning():
    """The reference modules carry none of the speed devices of minillm/fast: no fused kernels, row sums as
    products, query blocks, cached masks, in-place operators, out= arguments or preallocated outputs."""
    forbidden = ["fuse", "fusing", "row_means", "row_sums", "query_block", "QUERY_BLOCK", "mallopt", "out=",
                 "lru_cache", "empty("]
    folder = Path(layers.__file__).parent
    assert not (folder / "rows.py").exists()
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        found = [word for word in forbidden if word in text]
        found += [f"line {node.lineno}: in-place {type(node.op).__name__}" for node in ast.walk(ast.parse(text))
                  if isinstance(node, ast.AugAssign)]
        assert not found, f"{path.name}: {found}"


# ----------------------------------------------------------------------------------- layers

@given(B=B, T=T, n_in=WIDTH, n_out=WIDTH, bias=st.booleans(), weight_grads=st.booleans(), dtype=DTYPE, seed=SEED)
def test_linear(B, T, n_in, n_out, bias, weight_grads, dtype, seed):
    x, b = arrays(seed, dtype, (B, T, n_in), (n_out,) if bias else None)
    w = weight(seed + 1, dtype, n_in, n_out)
    assert_fast_matches_reference("linear", lambda: (x, w, b), dtype, None, dict(weight_grads=weight_grads), seed)


@example(B=1, T=1, C=1, bias=True, dtype="float64", seed=0)
@example(B=2, T=3, C=2, bias=False, dtype="float64", seed=0)
@given(B=B, T=T, C=WIDTH, bias=st.booleans(), dtype=DTYPE, seed=SEED)
def test_layernorm(B, T, C, bias, dtype, seed):
    x, w, b = arrays(seed, dtype, (B, T, C), (C,), (C,) if bias else None)
    x = x * 2 + 1  # rows with a mean away from 0
    assert_fast_matches_reference("layernorm", lambda: (x, w, b), dtype, seed=seed)


@given(B=B, T=T, C=WIDTH, scale=st.sampled_from([0.5, 3.0]), dtype=DTYPE, seed=SEED)
def test_gelu(B, T, C, scale, dtype, seed):
    """Errors against the size of x and dout: in the negative tail out = 0.5 x (1 + tanh u) and its
    derivative are differences of nearly equal numbers, right in either reading only to the
    rounding of x (at x = -6, out ~ 1e-10 x), so an array of tail values alone would compare its
    rounding noise with a tiny result."""
    x, = arrays(seed, dtype, (B, T, C), scale=scale)
    assert_fast_matches_reference("gelu", lambda: (x,), dtype, seed=seed, input_scale=True)


@given(B=B, T=T, N=WIDTH, scale=st.sampled_from([1.0, 3.0]), masked=st.booleans(), dtype=DTYPE, seed=SEED)
def test_softmax(B, T, N, scale, masked, dtype, seed):
    s, = arrays(seed, dtype, (B, T, N), scale=scale)
    if masked:  # -inf above the diagonal, as attention's scores
        s = s + numpy.triu(numpy.full((T, N), -numpy.inf, dtype=dtype), k=1)
    assert_fast_matches_reference("softmax", lambda: (s,), dtype, seed=seed)


@example(B=2, T=3, V=4, ignored=1.0, dtype="float64", seed=0)  # every target ignored
@given(B=B, T=T, V=st.integers(1, 9), ignored=st.sampled_from([0.0, 0.4, 1.0]), dtype=DTYPE, seed=SEED)
def test_cross_entropy(B, T, V, ignored, dtype, seed):
    logits, = arrays(seed, dtype, (B, T, V), scale=2.0)
    rng = numpy.random.default_rng(seed)
    targets = rng.integers(0, V, size=(B, T))
    targets[rng.random(size=(B, T)) < ignored] = layers.cross_entropy.IGNORE_INDEX
    assert_fast_matches_reference("cross_entropy", lambda: (logits, targets), dtype, seed=seed)


@given(B=B, T=T, C=st.integers(1, 5), bias=st.booleans(), weight_grads=st.booleans(), dtype=DTYPE, seed=SEED)
def test_mlp(B, T, C, bias, weight_grads, dtype, seed):
    x, b_fc, b_proj = arrays(seed, dtype, (B, T, C), (4 * C,) if bias else None, (C,) if bias else None)
    w_fc, w_proj = weight(seed + 1, dtype, C, 4 * C), weight(seed + 2, dtype, 4 * C, C)
    assert_fast_matches_reference("mlp", lambda: (x, w_fc, b_fc, w_proj, b_proj), dtype, None,
                                  dict(weight_grads=weight_grads), seed)


def attention_args(B, T, n_head, hs, bias, dtype, seed, dropout_p=0.0, scale=1.0):
    """make_args for attention: the inputs, and a fresh generator seeded alike for each call."""
    C = n_head * hs
    x, b_attn, b_proj = arrays(seed, dtype, (B, T, C), (3 * C,) if bias else None, (C,) if bias else None)
    w_attn, w_proj = weight(seed + 1, dtype, C, 3 * C) * scale, weight(seed + 2, dtype, C, C)
    return lambda: (x, w_attn, b_attn, w_proj, b_proj, n_head, dropout_p, backend.RNG(seed))


@example(B=1, T=1, n_head=1, hs=1, bias=True, weight_grads=True, dropout_p=0.3, query_block=1, scale=1.0,
         dtype="float64", seed=0)
@example(B=3, T=9, n_head=3, hs=3, bias=False, weight_grads=False, dropout_p=0.3, query_block=2, scale=1.0,
         dtype="float64", seed=1)
@given(B=B, T=st.integers(1, 9), n_head=st.integers(1, 3), hs=st.integers(1, 3), bias=st.booleans(),
       weight_grads=st.booleans(), dropout_p=st.sampled_from([0.0, 0.3]),
       query_block=st.one_of(st.integers(1, 6), st.none()), scale=st.sampled_from([1.0, 2.0]), dtype=DTYPE,
       seed=SEED)
def test_attention(B, T, n_head, hs, bias, weight_grads, dropout_p, query_block, scale, dtype, seed):
    """query_block None: the default, a single block at these T."""
    make_args = attention_args(B, T, n_head, hs, bias, dtype, seed, dropout_p, scale)
    options = {} if query_block is None else dict(query_block=query_block)
    assert_fast_matches_reference("attention", make_args, dtype, options, dict(weight_grads=weight_grads), seed)


@pytest.mark.parametrize("T", [fast.attention.QUERY_BLOCK - 1, fast.attention.QUERY_BLOCK,
                               fast.attention.QUERY_BLOCK + 1, 2 * fast.attention.QUERY_BLOCK + 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_attention_with_the_default_block_around_T(T, dtype):
    make_args = attention_args(1, T, 2, 2, True, dtype, seed=T, dropout_p=0.2)
    assert_fast_matches_reference("attention", make_args, dtype, seed=T)


@given(B=B, T=st.integers(1, 9), n_head=st.integers(1, 2), query_block=st.integers(1, 4), seed=SEED)
def test_attention_dropout_draws_the_reference_mask(B, T, n_head, query_block, seed):
    """Each causal block keeps exactly its slice of the reference's mask: bitwise, in float64."""
    make_args = attention_args(B, T, n_head, 2, True, "float64", seed, dropout_p=0.4)
    _, fast_cache = fast.attention.forward(*make_args(), query_block=query_block)
    _, reference_cache = layers.attention.forward(*make_args())
    reference_mask = reference_cache[6]
    assert reference_mask.shape == (B, n_head, T, T)
    for a, b, _, _, mask in fast_cache[4]:
        numpy.testing.assert_array_equal(mask, reference_mask[:, :, a:b, :b])


@given(B=st.integers(1, 2), n_head=st.integers(1, 3), hs=st.integers(1, 3), T=st.integers(1, 9),
       cuts=st.lists(st.integers(1, 8), max_size=4), query_block=st.integers(1, 4), dtype=DTYPE, seed=SEED)
@example(B=2, n_head=3, hs=2, T=5, cuts=[1, 2, 3, 4], query_block=4, dtype="float64", seed=0)  # one token a step
def test_kv_cache_decoding_gives_the_same_outputs(B, n_head, hs, T, cuts, query_block, dtype, seed):
    x, w_attn, b_attn, w_proj, b_proj, *_ = attention_args(B, T, n_head, hs, True, dtype, seed)()
    bounds = sorted({0, T, *(c for c in cuts if c < T)})
    outputs = []
    for package, options in ((fast, dict(query_block=query_block)), (layers, {})):
        kv_cache = package.attention.KVCache(B, n_head, T, hs, x.dtype, numpy)
        chunks = [package.attention.forward(x[:, a:b], w_attn, b_attn, w_proj, b_proj, n_head, kv_cache=kv_cache,
                                            **options) for a, b in zip(bounds, bounds[1:])]
        assert all(cache is None for _, cache in chunks)
        assert kv_cache.length == T
        with pytest.raises(ValueError, match="do not fit"):
            kv_cache.append(*(numpy.zeros((B, n_head, 1, hs), dtype=x.dtype),) * 2)
        kv_cache.clear()
        assert kv_cache.length == 0
        outputs.append(numpy.concatenate([out for out, _ in chunks], axis=1))
    full, _ = layers.attention.forward(x, w_attn, b_attn, w_proj, b_proj, n_head)
    assert_same_results(outputs[:1], outputs[1:], dtype)
    assert_same_results(outputs[1:], [full], dtype)


# ------------------------------------------------------------------------------ mutations

def layernorm_backward_without_the_var_path(dout, cache):
    """fast.layernorm.backward less the term -xhat * mean(dxhat * xhat)."""
    xhat, rstd, w, has_bias = cache
    rows = tuple(range(dout.ndim - 1))
    dxhat = dout * w
    dx = rstd * (dxhat - fast.layernorm.row_means(dxhat))
    return dx, (dout * xhat).sum(axis=rows), dout.sum(axis=rows) if has_bias else None


def causal_mask_one_key_late(T, past, dtype, xp):
    """Query t also sees key t + 1."""
    return xp.triu(xp.full((T, past + T), -xp.inf, dtype=dtype), k=past + 2)


def overlapping_query_blocks(T, query_block):
    """Each block but the first starts one query early: the forward is right, the keys' gradients count a row twice."""
    return [(max(a - 1, 0), min(a + query_block, T)) for a in range(0, T, query_block)]


def attention_case(**options):
    return lambda: assert_fast_matches_reference("attention", attention_args(2, 7, 2, 4, True, "float64", 5, **options),
                                                 "float64", dict(query_block=3), seed=5)


MUTATIONS = {
    "layernorm dx without the path through var": (
        (fast.layernorm, "backward", layernorm_backward_without_the_var_path),
        lambda: assert_fast_matches_reference("layernorm", lambda: arrays(3, "float64", (2, 3, 5), (5,), (5,)),
                                              "float64")),
    "causal mask one key late": ((fast.attention, "causal_mask", causal_mask_one_key_late), attention_case()),
    "causal blocks overlapping by one query": ((fast.attention, "query_blocks", overlapping_query_blocks),
                                               attention_case()),
    "attention scale 1 / hs instead of 1 / sqrt(hs)": (
        (fast.attention, "math", types.SimpleNamespace(sqrt=lambda n: n)), attention_case()),
    "attention backward without the dropout mask": (
        (fast.attention, "dropout", types.SimpleNamespace(backward=lambda dout, cache: dout)),
        attention_case(dropout_p=0.3)),
    "GELU constant sqrt(2 / pi) off by 1e-9 relative": (
        (fast.gelu, "K", fast.gelu.K * (1 + 1e-9)),
        lambda: assert_fast_matches_reference("gelu", lambda: arrays(1, "float64", (2, 3, 4)), "float64")),
    "softmax backward without the row-sum term": (
        (fast.softmax, "backward", lambda dp, p: p * dp),
        lambda: assert_fast_matches_reference("softmax", lambda: arrays(2, "float64", (2, 3, 4)), "float64")),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_comparison_catches_a_wrong_fast_layer(mutation, monkeypatch):
    (module, attribute, wrong), check = MUTATIONS[mutation]
    check()  # right as it is ...
    monkeypatch.setattr(module, attribute, wrong)
    with pytest.raises(AssertionError, match="relative error"):  # ... and caught when wrong
        check()
