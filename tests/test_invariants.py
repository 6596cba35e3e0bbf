"""Invariants the math promises, beyond matching gradients.

- causality: tokens after position t leave the logits at positions <= t exactly unchanged;
- the loss at GPT-2 initialisation is close to ln(vocab_size);
- attention rows are probabilities, exactly 0 above the diagonal, and the causal blocks of the fast
  attention give the unblocked numbers; LayerNorm rows are standardised;
- forward and backward, reference and fast layers alike, leave their inputs, dout and the cache as
  they found them; the model's
  backward releases each block's activations once used, and asks for a new forward after;
- dropout: the identity at p = 0 and in eval mode, Bernoulli(1 - p) masks scaled by 1 / (1 - p);
- the tied embedding's gradient is the sum of its two uses;
- averaged micro-batch gradients (and the AdamW step from them) equal the full batch's;
- cross-entropy ignores IGNORE_INDEX targets; bad token ids and impossible configs are refused;
- AdamW decays matrices only; clip_grad_norm and cosine_lr keep their documented contracts.
"""

import math

import numpy
import pytest
from helpers import random_tokens, tiny_model
from hypothesis import given, strategies as st

import minillm.fast
import minillm.layers
from minillm import backend, testing
from minillm.errors import ConfigError
from minillm.layers import cross_entropy, dropout, embedding, layernorm, softmax
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW, clip_grad_norm, cosine_lr

SEED = st.integers(0, 2**32 - 1)


@st.composite
def small_configs(draw, dropout_values=(0.0,)):
    """n_embd >= 2: with one feature every LayerNorm outputs 0 and (without biases) the logits are 0."""
    n_head = draw(st.integers(1, 3))
    return dict(vocab_size=draw(st.integers(2, 7)), block_size=draw(st.integers(1, 5)),
                n_layer=draw(st.integers(1, 2)), n_head=n_head, n_embd=n_head * draw(st.integers(-(-2 // n_head), 4)),
                dropout=draw(st.sampled_from(dropout_values)), bias=draw(st.booleans()))


# ---------------------------------------------------------------------------------------- causality

@given(config=small_configs(dropout_values=(0.0, 0.3)), data=st.data(), seed=SEED)
def test_future_tokens_do_not_change_earlier_logits(config, data, seed):
    model = tiny_model(seed=seed, **config).train(data.draw(st.booleans(), label="training"))
    T = config["block_size"]
    t = data.draw(st.integers(0, T - 1), label="t")
    idx = random_tokens(config["vocab_size"], (2, T), seed)
    changed = idx.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % config["vocab_size"]  # every later token differs
    # In training with dropout, a freshly seeded generator per pass draws the same masks for both inputs.
    model.reseed(seed)
    before = model(idx)[0]
    model.reseed(seed)
    after = model(changed)[0]
    assert numpy.array_equal(before[:, : t + 1], after[:, : t + 1])
    if t + 1 < T:  # and the change is visible where it is allowed to be
        assert not numpy.array_equal(before[:, t + 1:], after[:, t + 1:])


# ------------------------------------------------------------------------------ loss at initialisation

def test_loss_at_initialisation_is_close_to_ln_vocab_size():
    V, C, B, T = 65, 32, 8, 16
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=C), seed=0, dtype="float64")
    _, loss = model(random_tokens(V, (B, T), 0), random_tokens(V, (B, T), 1))
    # The final LayerNorm's rows have unit variance, so logits = h . wte_v with wte_v ~ N(0, 0.02^2)
    # have std s = 0.02 sqrt(C). For small logits, loss = ln V + ln(mean_v exp z_v) - z_y
    # ~ ln V + s^2 / 2 - z_y: the bias is s^2 / 2 and the mean of z_y over the B T random targets
    # has standard error s / sqrt(B T). The tied embedding adds a little: the logit of a position's
    # own input token is ~0.02^2 C / (0.02 sqrt(2)) higher, which raises ln(mean exp) by at most
    # (e^that - 1) / V. Bound: those terms plus 5 standard errors.
    s = 0.02 * math.sqrt(C)
    own_token = 0.02**2 * C / (0.02 * math.sqrt(2))
    bound = s * s / 2 + (math.exp(own_token) - 1) / V + 5 * s / math.sqrt(B * T)
    assert abs(float(loss) - math.log(V)) < bound, (float(loss), math.log(V), bound)


# -------------------------------------------------------------------------- attention probabilities

@given(B=st.integers(1, 3), T=st.integers(1, 5), n_head=st.integers(1, 3), head_size=st.integers(1, 4),
       dropout_p=st.sampled_from([0.0, 0.4]), scale=st.sampled_from([1.0, 30.0]), query_block=st.integers(1, 6),
       seed=SEED)
def test_attention_rows_are_probabilities_and_zero_above_the_diagonal(B, T, n_head, head_size, dropout_p, scale,
                                                                     query_block, seed):
    rng = numpy.random.default_rng(seed)
    C = n_head * head_size
    x = rng.normal(size=(B, T, C)) * scale  # large scores too: softmax must not overflow
    weights = rng.normal(size=(C, 3 * C)), rng.normal(size=3 * C), rng.normal(size=(C, C)), rng.normal(size=C)
    _, cache = minillm.fast.attention.forward(x, *weights, n_head, dropout_p, backend.RNG(seed),
                                              query_block=query_block)
    blocks = cache[4]
    assert [(a, b) for a, b, *_ in blocks] == [(a, min(a + query_block, T)) for a in range(0, T, query_block)]
    _, reference_cache = minillm.layers.attention.forward(x, *weights, n_head, dropout_p, backend.RNG(seed))
    Pd, P = reference_cache[4:6]  # the reference's full square: one block of all T queries
    for a, b, Pd, P, _ in blocks + [(0, T, Pd, P, None)]:  # queries a..b-1 against keys 0..b-1; Pd after dropout
        above = numpy.triu(numpy.ones((b - a, b), dtype=bool), k=a + 1)  # key u > query position a + t
        for A in (P, Pd):
            assert A.shape == (B, n_head, b - a, b)
            assert numpy.all(A[..., above] == 0.0)
        assert numpy.all(numpy.isfinite(P)) and numpy.all(P >= 0)
        numpy.testing.assert_allclose(P.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
        if dropout_p == 0.0:
            assert Pd is P


@given(B=st.integers(1, 2), T=st.integers(1, 7), n_head=st.integers(1, 2), query_block=st.integers(1, 7), seed=SEED)
def test_causal_blocks_give_the_unblocked_numbers(B, T, n_head, query_block, seed):
    rng = numpy.random.default_rng(seed)
    C = 2 * n_head
    inputs = (rng.normal(size=(B, T, C)), rng.normal(size=(C, 3 * C)), rng.normal(size=3 * C),
              rng.normal(size=(C, C)), None)
    dout = rng.normal(size=(B, T, C))
    results = []
    for block in (query_block, T):
        out, cache = minillm.fast.attention.forward(*inputs, n_head, query_block=block)
        results.append([out, *(g for g in minillm.fast.attention.backward(dout, cache) if g is not None)])
    for blocked, whole in zip(*results):
        numpy.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-12)


def test_softmax_gives_exact_zeros_for_minus_infinity():
    s = numpy.random.default_rng(0).normal(size=(4, 6)) * 50
    s[:, 1::2] = -numpy.inf
    p, _ = softmax.forward(s)
    assert numpy.all(p[:, 1::2] == 0.0)
    numpy.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------- LayerNorm

@given(rows=st.integers(1, 6), C=st.integers(2, 12), mean=st.floats(-10, 10), std=st.floats(0.01, 100), seed=SEED)
def test_layernorm_rows_have_zero_mean_and_unit_variance(rows, C, mean, std, seed):
    x = numpy.random.default_rng(seed).normal(mean, std, size=(rows, C))
    out, _ = layernorm.forward(x, numpy.ones(C), numpy.zeros(C))
    numpy.testing.assert_allclose(out.mean(axis=-1), 0.0, rtol=0, atol=1e-12)
    # var(out) = var / (var + eps): a hair under 1, and visibly so for small variances.
    var = x.var(axis=-1)
    numpy.testing.assert_allclose(out.var(axis=-1), var / (var + layernorm.EPS), rtol=1e-10)


# ------------------------------------------------------------------------------ no hidden writes

def layer_cases(rng, package):
    """(name, forward, inputs, backward) of package's layers with float64 inputs; dropout on where a layer has it."""
    L = package
    x, w = rng.normal(size=(2, 4, 6)), lambda *shape: rng.normal(size=shape)
    targets = numpy.array([[0, 1, -1, 5], [2, 2, 3, 4]])
    return [
        ("linear", L.linear.forward, (x, w(6, 5), w(5)), L.linear.backward),
        ("layernorm", L.layernorm.forward, (x, w(6), w(6)), L.layernorm.backward),
        ("gelu", L.gelu.forward, (x,), L.gelu.backward),
        ("softmax", L.softmax.forward, (x,), L.softmax.backward),
        ("dropout", lambda x: L.dropout.forward(x, 0.5, backend.RNG(0)), (x,), L.dropout.backward),
        ("mlp", L.mlp.forward, (x, w(6, 24), w(24), w(24, 6), w(6)), L.mlp.backward),
        ("attention", lambda *a: L.attention.forward(*a, 3, 0.3, backend.RNG(0)), (x, w(6, 18), w(18), w(6, 6), w(6)),
         L.attention.backward),
        ("embedding", L.embedding.forward, (rng.integers(0, 5, (2, 4)), w(5, 6), w(4, 6)), L.embedding.backward),
        ("cross_entropy", lambda z: L.cross_entropy.forward(z, targets), (x,), L.cross_entropy.backward),
        ("lora", lambda *a: L.lora.forward(*a, 2.0), (w(6, 5), w(6, 2), w(2, 5)), L.lora.backward),
    ]


@pytest.mark.parametrize("package", [minillm.layers, minillm.fast], ids=["reference", "fast"])
@pytest.mark.parametrize("case", range(10),
                         ids=[c[0] for c in layer_cases(numpy.random.default_rng(0), minillm.layers)])
def test_layers_do_not_write_to_their_inputs_or_dout(package, case):
    """The model reuses activations and gradients (residuals, the tied wte) after passing them on."""
    name, forward, inputs, backward = layer_cases(numpy.random.default_rng(0), package)[case]
    kept = [a.copy() for a in inputs]
    out, cache = forward(*inputs)
    dout = numpy.random.default_rng(1).normal(size=numpy.shape(out))
    dout_kept = dout.copy()
    first = backward(dout if numpy.ndim(out) else float(dout), cache)
    first = [numpy.array(g, copy=True) for g in (first if isinstance(first, tuple) else (first,)) if g is not None]
    second = backward(dout_kept.copy() if numpy.ndim(out) else float(dout_kept), cache)  # the cache is intact
    second = [g for g in (second if isinstance(second, tuple) else (second,)) if g is not None]
    for a, a_kept in zip(inputs, kept):
        numpy.testing.assert_array_equal(a, a_kept, err_msg=f"{name} changed an input")
    numpy.testing.assert_array_equal(dout, dout_kept, err_msg=f"{name} changed dout")
    for g1, g2 in zip(first, second, strict=True):
        numpy.testing.assert_array_equal(g1, g2, err_msg=f"{name}: a second backward differs")


# ---------------------------------------------------------------------------------------- dropout

def test_dropout_at_p_zero_or_without_generator_is_the_identity():
    x = numpy.random.default_rng(0).normal(size=(3, 4))
    for p, rng in [(0.0, backend.RNG(0)), (0.5, None)]:
        out, cache = dropout.forward(x, p, rng)
        assert out is x
        g = numpy.ones_like(x)
        assert dropout.backward(g, cache) is g


def test_dropout_is_off_in_eval_and_on_in_training():
    model = tiny_model(dtype="float32", vocab_size=11, block_size=8, n_embd=8, dropout=0.5)
    idx = random_tokens(11, (2, 8), 0)
    model.eval()
    assert numpy.array_equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not numpy.array_equal(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(p):
    n = 200_000
    x = numpy.random.default_rng(1).normal(size=(400, n // 400)) + 5.0  # no zeros in x
    out, mask = dropout.forward(x, p, backend.RNG(2))
    dropped = out == 0
    # Fraction dropped ~ p with standard error sqrt(p (1 - p) / n); the mask's mean ~ 1 with
    # standard error sqrt(p / ((1 - p) n)). Allow 5 standard errors.
    assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(mask.mean() - 1.0) < 5 * math.sqrt(p / ((1 - p) * n))
    numpy.testing.assert_array_equal(mask == 0, dropped)
    numpy.testing.assert_allclose(out[~dropped], x[~dropped] / (1 - p), rtol=1e-12)


def test_model_backward_releases_each_block_and_needs_a_new_forward():
    model = tiny_model(n_layer=3)
    idx = random_tokens(7, (2, 5), 0)
    model(idx, idx)
    blocks = model._cache[2]
    assert len(blocks) == 3
    model.backward()
    assert blocks == []  # the activations of every block were let go
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward()
    model.eval()(idx, idx)  # evaluation keeps nothing for backward
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward()


# ----------------------------------------------------------------------------------- tied embedding

def test_tied_embedding_gradient_is_the_sum_of_both_uses(monkeypatch):
    model = tiny_model(vocab_size=7, block_size=4, n_head=1, n_embd=4)
    idx, targets = numpy.array([[0, 1, 1, 2]]), numpy.array([[1, 2, 3, 4]])  # tokens 3..6 are never input
    model(idx, targets)
    full = model.backward()["wte.weight"]

    # Untie: let the embedding read a copy of wte; finite differences then give each use's share.
    wte_embed = model.params["wte.weight"].copy()
    real_forward = embedding.forward
    monkeypatch.setattr(embedding, "forward", lambda idx, wte, wpe: real_forward(idx, wte_embed, wpe))
    loss = lambda: model(idx, targets)[1]
    embed_share = testing.numerical_gradient(loss, wte_embed)
    head_share = testing.numerical_gradient(loss, model.params["wte.weight"])

    assert testing.relative_error(full, embed_share + head_share) <= testing.TOLERANCE
    row_norm = lambda g: numpy.linalg.norm(g, axis=1)
    assert numpy.all(row_norm(head_share) > 1e-3 * row_norm(full).max())  # every row is a logit
    assert numpy.all(embed_share[3:] == 0.0)  # absent tokens: head only ...
    assert testing.relative_error(full[3:], head_share[3:]) <= testing.TOLERANCE
    assert numpy.all(row_norm(embed_share[:3]) > 1e-3 * row_norm(full).max())  # ... present ones: both


# --------------------------------------------------------------------------- gradient accumulation

def test_averaged_micro_batch_gradients_and_step_equal_the_full_batch():
    config = dict(vocab_size=9, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.0)
    idx, targets = random_tokens(9, (4, 6), 1), random_tokens(9, (4, 6), 2)
    full_model, micro_model = tiny_model(seed=3, **config), tiny_model(seed=3, **config)
    full_model(idx, targets)
    full = full_model.backward()
    halves = []
    for part in (slice(0, 2), slice(2, 4)):
        micro_model(idx[part], targets[part])
        halves.append(micro_model.backward())
    accumulated = {name: (halves[0][name] + halves[1][name]) / 2 for name in full}
    for name in full:
        numpy.testing.assert_allclose(accumulated[name], full[name], rtol=1e-10, atol=1e-14, err_msg=name)
    AdamW(full_model.params, lr=1e-2).step(full)
    AdamW(micro_model.params, lr=1e-2).step(accumulated)
    for name in full:
        numpy.testing.assert_allclose(micro_model.params[name], full_model.params[name], rtol=1e-10, err_msg=name)


# ------------------------------------------------------------------------------------ ignore index

@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(2, 7), seed=SEED)
def test_cross_entropy_ignores_ignore_index(B, T, V, seed):
    rng = numpy.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)) * 2
    targets = rng.integers(0, V, size=(B, T))
    ignored = rng.random(size=(B, T)) < 0.4
    targets[ignored] = cross_entropy.IGNORE_INDEX
    loss, cache = cross_entropy.forward(logits, targets)
    dlogits = cross_entropy.backward(1.0, cache)
    assert numpy.all(dlogits[ignored] == 0.0)
    counted = ~ignored
    if counted.any():  # the mean over counted positions of logsumexp(z) - z_y
        z = logits[counted]
        expected = (numpy.log(numpy.exp(z).sum(axis=-1)) - z[numpy.arange(len(z)), targets[counted]]).mean()
        assert float(loss) == pytest.approx(expected, rel=1e-12)
    else:
        assert float(loss) == 0.0 and numpy.all(dlogits == 0.0)
    other = logits.copy()
    other[ignored] = rng.normal(size=(int(ignored.sum()), V)) * 10
    assert cross_entropy.forward(other, targets)[0] == loss


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    logits = numpy.random.default_rng(0).normal(size=(2, 3, 5))
    loss, cache = cross_entropy.forward(logits, numpy.full((2, 3), cross_entropy.IGNORE_INDEX))
    assert float(loss) == 0.0
    assert numpy.all(cross_entropy.backward(1.0, cache) == 0.0)


# ------------------------------------------------------------------------------ refused inputs

@pytest.mark.parametrize("idx", [[[0, -1]], [[0, 11]], [[3] * 9], [[0, -12]]],
                         ids=["negative", "vocab_size", "longer_than_block", "negative_wrapping"])
def test_bad_token_ids_are_refused(idx):
    model = tiny_model(vocab_size=11, block_size=8, randomize=False)
    with pytest.raises(embedding.TokenIdError):
        model(numpy.array(idx))


@pytest.mark.parametrize("bad_target", [-2, 11])
def test_bad_targets_are_refused(bad_target):
    # Targets are token ids too: only [0, vocab_size) and IGNORE_INDEX (-1) mean something.
    # NumPy would read -2 as the second-to-last logit; CuPy wraps every out-of-range index.
    model = tiny_model(vocab_size=11, block_size=8, randomize=False)
    idx = numpy.zeros((1, 3), dtype=numpy.int64)
    with pytest.raises(embedding.TokenIdError):
        model(idx, numpy.array([[0, cross_entropy.IGNORE_INDEX, bad_target]]))


@pytest.mark.parametrize("changes", [
    dict(n_embd=10, n_head=3), dict(n_embd=0), dict(n_head=0), dict(n_layer=0), dict(vocab_size=0),
    dict(block_size=0), dict(dropout=1.0), dict(dropout=-0.1), dict(n_layer=1.5), dict(n_layer=True),
])
def test_impossible_configs_are_refused(changes):
    with pytest.raises(ConfigError):
        GPTConfig(**(dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8) | changes))


# ----------------------------------------------------------------------------------------- optim

@given(lr=st.floats(1e-4, 1.0), weight_decay=st.floats(0.01, 0.5))
def test_adamw_decays_matrices_but_not_biases_or_gains(lr, weight_decay):
    model = tiny_model(n_layer=1, seed=0)
    params = model.params
    before = {name: p.copy() for name, p in params.items()}
    AdamW(params, lr=lr, weight_decay=weight_decay).step({name: numpy.zeros_like(p) for name, p in params.items()})
    assert any(p.ndim == 1 for p in params.values()) and any(p.ndim == 2 for p in params.values())
    for name, p in params.items():
        expected = before[name] * (1.0 - lr * weight_decay) if p.ndim >= 2 else before[name]
        numpy.testing.assert_allclose(p, expected, rtol=1e-14, atol=0, err_msg=name)


# The ratio max_norm / norm avoids a band around 1: the implementation's scale is
# min(1, max_norm / (norm + 1e-6)), so norms within 1e-6 below max_norm are shrunk slightly too.
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), scale=st.floats(1.0, 100.0),
       ratio=st.one_of(st.floats(0.05, 0.99), st.floats(1.01, 20.0)), seed=SEED)
def test_clip_grad_norm(sizes, scale, ratio, seed):
    rng = numpy.random.default_rng(seed)
    grads = {f"g{i}": rng.uniform(0.5, 1.5, size=(n, 2)) * rng.choice([-scale, scale], size=(n, 2))
             for i, n in enumerate(sizes)}
    before = {k: g.copy() for k, g in grads.items()}
    global_norm = lambda gs: numpy.linalg.norm(numpy.concatenate([g.ravel() for g in gs.values()]))
    true_norm = global_norm(grads)
    max_norm = true_norm * ratio
    returned = clip_grad_norm(grads, max_norm)
    assert float(returned) == pytest.approx(true_norm, rel=1e-12)  # the norm before clipping
    if ratio > 1.0:  # under the limit: untouched
        for k in grads:
            numpy.testing.assert_array_equal(grads[k], before[k])
    else:  # every array scaled by the same factor, to the limit (norms here are >= 0.7: 1e-6 is < 1.5e-6 of them)
        new_norm = global_norm(grads)
        assert new_norm <= max_norm
        assert new_norm == pytest.approx(max_norm, rel=1e-5)
        for k in grads:
            numpy.testing.assert_allclose(grads[k], before[k] * (new_norm / true_norm), rtol=1e-9)


@given(warmup=st.integers(0, 20), decay_span=st.integers(0, 60), max_lr=st.floats(1e-5, 1.0),
       min_fraction=st.floats(0.0, 1.0))
def test_cosine_lr_schedule(warmup, decay_span, max_lr, min_fraction):
    min_lr = max_lr * min_fraction
    decay_iters = warmup + decay_span
    lr = [cosine_lr(step, max_lr, min_lr, warmup, decay_iters) for step in range(decay_iters + 10)]
    if warmup:  # linear: equal increments from max_lr / warmup up to max_lr at the last warmup step
        steps = numpy.diff([0.0] + lr[:warmup])
        numpy.testing.assert_allclose(steps, max_lr / warmup, rtol=1e-9)
        assert lr[warmup - 1] == pytest.approx(max_lr, rel=1e-12)
    if decay_span:
        assert lr[warmup] == pytest.approx(max_lr, rel=1e-12)  # the decay starts at the maximum
        decay = lr[warmup: decay_iters + 1]
        assert all(a >= b for a, b in zip(decay, decay[1:]))
        if decay_span % 2 == 0:
            assert lr[warmup + decay_span // 2] == pytest.approx((max_lr + min_lr) / 2, rel=1e-9)
    assert all(x == min_lr for x in lr[decay_iters:])
