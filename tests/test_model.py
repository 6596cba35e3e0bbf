"""The whole GPT: gradients against finite differences, and the invariants its math promises.

- model.backward() matches central differences for every parameter (float64, generated
  configs with dropout, with and without biases, one head, sequence length 1, vocab 2);
- causality: tokens after position t leave the logits at and before t exactly unchanged;
- the loss at initialisation is close to ln(vocab_size); attention rows sum to 1;
- LayerNorm rows have zero mean and unit variance; dropout is the identity at p = 0 and off in eval;
- the tied embedding gets gradient from both of its uses;
- averaged micro-batch gradients equal the large batch's, and so do the AdamW updates;
- a tiny model memorises one batch; bad token ids and impossible configs are refused.
"""

import math
import subprocess
import sys

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import backend, gradcheck
from minillm.layers import attention, dropout, embedding, layernorm
from minillm.model import GPT, ConfigError, GPTConfig
from minillm.optim import AdamW


@st.composite
def configs(draw, dropout_values=(0.0, 0.2)):
    """Small configs, n_embd >= 3: LayerNorm maps 1 feature to 0 and 2 features to +-1, whatever the input."""
    n_head = draw(st.integers(1, 3))
    head_size = draw(st.integers(-(-3 // n_head), 3))
    return GPTConfig(
        vocab_size=draw(st.integers(2, 6)), block_size=draw(st.integers(1, 4)), n_layer=draw(st.integers(1, 2)),
        n_head=n_head, n_embd=n_head * head_size, dropout=draw(st.sampled_from(dropout_values)),
        bias=draw(st.booleans()),
    )


def random_batch(config, batch_size, T, seed):
    rng = numpy.random.default_rng(seed)
    shape = (batch_size, T)
    return rng.integers(0, config.vocab_size, shape), rng.integers(0, config.vocab_size, shape)


@settings(max_examples=12, deadline=None)
@given(config=configs(), batch_size=st.integers(1, 2), data=st.data(), seed=st.integers(0, 2**16))
def test_model_gradients_match_finite_differences(config, batch_size, data, seed):
    T = data.draw(st.integers(1, config.block_size))
    model = GPT(config, seed=seed, dtype="float64")
    gradcheck.randomize(model.params, seed)
    idx, targets = random_batch(config, batch_size, T, seed)
    errors = gradcheck.model_gradient_errors(model, idx, targets, dropout_seed=seed)
    assert errors.keys() == model.params.keys()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= gradcheck.TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"


def test_gradcheck_command_reports_and_can_fail():
    command = [sys.executable, "-m", "minillm.gradcheck", "--n-layer", "1", "--block-size", "3"]
    passing = subprocess.run(command, capture_output=True, text=True)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "h.0.attn.c_attn.weight" in passing.stdout and " 0 failed" in passing.stdout
    failing = subprocess.run(command + ["--tolerance", "1e-30"], capture_output=True, text=True)
    assert failing.returncode == 1
    assert "FAIL" in failing.stdout


@settings(max_examples=20, deadline=None)
@given(config=configs(dropout_values=(0.0,)), data=st.data(), seed=st.integers(0, 2**16))
def test_future_tokens_do_not_change_past_logits(config, data, seed):
    T = config.block_size
    t = data.draw(st.integers(0, T - 1))
    model = GPT(config, seed=seed, dtype="float64")
    gradcheck.randomize(model.params, seed)
    idx, _ = random_batch(config, 2, T, seed)
    changed = idx.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % config.vocab_size
    before, _ = model(idx)
    after, _ = model(changed)
    assert numpy.array_equal(before[:, : t + 1], after[:, : t + 1])
    if t + 1 < T:
        assert not numpy.array_equal(before[:, t + 1:], after[:, t + 1:])


def test_loss_at_initialisation_is_close_to_uniform():
    # GPT-2's init makes the logits nearly equal (std ~0.02 * sqrt(n_embd) after the final
    # LayerNorm's unit rows dot 0.02-std embeddings: ~0.2), so the loss is ln(V) plus
    # about half the logit variance: within 0.1 of ln(V).
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config, seed=0)
    idx, targets = random_batch(config, 8, 16, 0)
    _, loss = model(idx, targets)
    assert abs(float(loss) - math.log(65)) < 0.1


def test_attention_rows_are_probabilities_with_nothing_above_the_diagonal():
    rng = numpy.random.default_rng(0)
    B, T, n_head, C = 2, 6, 3, 12
    weights = rng.normal(size=(C, 3 * C)), rng.normal(size=3 * C), rng.normal(size=(C, C)), rng.normal(size=C)
    _, cache = attention.forward(rng.normal(size=(B, T, C)), *weights, n_head)
    P = cache[4]  # the attention weights (no dropout here)
    assert P.shape == (B, n_head, T, T)
    numpy.testing.assert_allclose(P.sum(axis=-1), 1.0, rtol=1e-12)
    assert numpy.all(P[..., numpy.triu_indices(T, k=1)[0], numpy.triu_indices(T, k=1)[1]] == 0.0)


def test_layernorm_rows_have_zero_mean_and_unit_variance():
    x = numpy.random.default_rng(0).normal(3.0, 5.0, size=(4, 7, 16))
    out, _ = layernorm.forward(x, numpy.ones(16), numpy.zeros(16))
    numpy.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-12)
    # The variance is var / (var + eps), a hair below 1.
    var = x.var(axis=-1)
    numpy.testing.assert_allclose(out.var(axis=-1), var / (var + layernorm.EPS), rtol=1e-12)


def test_dropout_identity_at_zero_and_mask_statistics():
    x = numpy.random.default_rng(0).normal(size=(200, 500))
    out, cache = dropout.forward(x, 0.0, backend.RNG(0))
    assert out is x and dropout.backward(x, cache) is x
    out, mask = dropout.forward(x, 0.25, backend.RNG(0))
    dropped = mask == 0
    assert abs(dropped.mean() - 0.25) < 0.01  # 100,000 draws: standard error 0.0014
    numpy.testing.assert_allclose(out[~dropped], x[~dropped] / 0.75)


def test_dropout_is_on_in_training_and_off_in_eval():
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.5)
    model = GPT(config, seed=0)
    idx, _ = random_batch(config, 2, 8, 0)
    model.eval()
    assert numpy.array_equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not numpy.array_equal(model(idx)[0], model(idx)[0])


def test_tied_embedding_gets_gradient_from_both_uses():
    config = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = GPT(config, seed=0, dtype="float64")
    gradcheck.randomize(model.params, 0)
    idx = numpy.array([[0, 1, 1, 2]])  # tokens 3..6 never appear in the input
    targets = numpy.array([[1, 2, 3, 4]])
    model(idx, targets)
    grads = model.backward()
    # The LM head's share: logits = h @ wte^T, so dwte_head = dlogits^T @ h.
    from minillm.layers import cross_entropy

    emb_cache, emb_drop, blocks, ln_f, head, loss_cache = model._cache
    dlogits = cross_entropy.backward(1.0, loss_cache)
    h = head[0].reshape(-1, 4)
    head_share = dlogits.reshape(-1, 7).T @ h
    numpy.testing.assert_allclose(grads["wte.weight"][3:], head_share[3:], rtol=1e-12)  # head only
    assert numpy.abs(grads["wte.weight"][:3] - head_share[:3]).min() > 1e-8  # plus the embedding's share


def test_averaged_micro_batches_equal_the_large_batch():
    config = GPTConfig(vocab_size=9, block_size=6, n_layer=2, n_head=2, n_embd=8)
    idx, targets = random_batch(config, 4, 6, 1)
    large = GPT(config, seed=3, dtype="float64")
    small = GPT(config, seed=3, dtype="float64")
    large(idx, targets)
    full = large.backward()
    accumulated = None
    for part in (slice(0, 2), slice(2, 4)):
        small(idx[part], targets[part])
        grads = small.backward()
        accumulated = grads if accumulated is None else {k: accumulated[k] + g for k, g in grads.items()}
    for name in full:
        numpy.testing.assert_allclose(accumulated[name] / 2, full[name], rtol=1e-10, atol=1e-14)
    AdamW(large.params, lr=1e-2).step(full)
    AdamW(small.params, lr=1e-2).step({k: g / 2 for k, g in accumulated.items()})
    for name in full:
        numpy.testing.assert_allclose(small.params[name], large.params[name], rtol=1e-10, atol=1e-12)


def test_a_tiny_model_memorises_one_batch():
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config, seed=0)
    idx, targets = random_batch(config, 4, 8, 0)
    optimizer = AdamW(model.params, lr=1e-2, weight_decay=0.0)
    first = float(model(idx, targets)[1])
    for _ in range(300):
        _, loss = model(idx, targets)
        optimizer.step(model.backward())
    assert first > 2.0 and float(loss) < 0.05


@pytest.mark.parametrize(
    "idx, message",
    [
        (numpy.array([[0, 11]]), r"\[0, 11\)"),
        (numpy.array([[-1, 0]]), r"\[0, 11\)"),
        (numpy.zeros((1, 9), dtype=numpy.int64), "block_size 8"),
        (numpy.zeros((1, 2), dtype=numpy.float32), "integers"),
        (numpy.zeros(4, dtype=numpy.int64), "shape"),
    ],
)
def test_bad_token_ids_are_refused(idx, message):
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(embedding.TokenIdError, match=message):
        model(idx)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_embd=10, n_head=3), "divisible"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_impossible_configs_are_refused(changes, message):
    options = dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8) | changes
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**options)
