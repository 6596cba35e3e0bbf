"""The whole model gives the same numbers on its two readings of the layers.

GPT(..., reference=True) runs on minillm.layers (the equations as written), the default on
minillm.fast (the tuned twins). Checked here, model-wide (tests/test_fast.py checks each
layer alone):
- float64, same seed: logits, loss and every gradient agree to 1e-10 relative, with dropout,
  without biases, with frozen parameters and LoRA adapters, and past the fast attention's
  query block (T > 128), where the two draw their dropout masks in different pieces;
- cached decoding gives the same logits on both;
- a few hundred float32 training steps of the `baby` shape through train_step give the
  same losses within float32 tolerance.
"""

import numpy
import pytest
from helpers import random_tokens
from hypothesis import example, given, settings, strategies as st
from threadpoolctl import threadpool_limits

from minillm import fast, finetune, gradcheck
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW
from minillm.readback import NonfiniteWatch
from minillm.training import TrainConfig, train_step

RTOL = 1e-10


def both_models(config, seed, dtype="float64"):
    """(fast, reference) models with the same random weights (no unit gains, no zero biases)."""
    models = [GPT(config, seed=seed, dtype=dtype, reference=reference) for reference in (False, True)]
    for model in models:
        gradcheck.randomize(model.params, seed)
    return models


def assert_close(got, expected, what):
    scale = max(numpy.abs(expected).max(initial=0.0), 1e-300)
    error = numpy.abs(got - expected).max(initial=0.0) / scale
    assert error <= RTOL, f"{what}: relative error {error:.2e}"


def forward_backward(model, idx, targets, seed):
    model.reseed(seed)
    logits, loss = model(idx, targets)
    return logits, loss, model.backward()


# n_embd >= 3: with 2 features every LayerNorm output is +-1 and its backward cancels so deeply
# that 1e-16 roundings grow to 1e-9 in both readings alike (see tests/test_model_grad.py).
@st.composite
def configs(draw):
    n_head = draw(st.sampled_from([1, 2, 3]))
    return GPTConfig(
        vocab_size=draw(st.integers(2, 9)), block_size=draw(st.integers(1, 9)), n_layer=draw(st.integers(1, 3)),
        n_head=n_head, n_embd=n_head * draw(st.integers(-(-3 // n_head), 4)), dropout=draw(st.sampled_from([0.0, 0.2])),
        bias=draw(st.booleans()),
    )


@settings(max_examples=25, deadline=None)
@given(config=configs(), batch_size=st.integers(1, 3), data=st.data(), seed=st.integers(0, 2**16))
@example(config=GPTConfig(vocab_size=5, block_size=200, n_layer=2, n_head=2, n_embd=4, dropout=0.2),
         batch_size=1, data=None, seed=0)  # two query blocks in the fast attention
def test_logits_loss_and_every_gradient_agree(config, batch_size, data, seed):
    T = config.block_size if data is None else data.draw(st.integers(1, config.block_size), label="T")
    idx = random_tokens(config.vocab_size, (batch_size, T), seed)
    targets = random_tokens(config.vocab_size, (batch_size, T), seed + 1)
    fast_model, reference_model = both_models(config, seed)
    fast_logits, fast_loss, fast_grads = forward_backward(fast_model, idx, targets, seed)
    logits, loss, grads = forward_backward(reference_model, idx, targets, seed)
    assert_close(fast_logits, logits, "logits")
    assert_close(fast_loss, loss, "loss")
    assert fast_grads.keys() == grads.keys() == fast_model.params.keys()
    for name in grads:
        assert_close(fast_grads[name], grads[name], name)


@pytest.mark.parametrize("tuning", ["frozen", "lora"])
def test_fine_tuning_gradients_agree(tuning):
    config = GPTConfig(vocab_size=7, block_size=6, n_layer=3, n_head=2, n_embd=8, dropout=0.1)
    models = both_models(config, seed=4)
    if tuning == "lora":
        models = [finetune.with_lora(model, 2, alpha=3.0, targets="attn,mlp", seed=5) for model in models]
        for model in models:
            gradcheck.randomize(model.params, 6)
    else:
        for model in models:
            model.frozen = {name for name in model.params if name.startswith(("h.0.", "wte", "wpe"))}
    idx, targets = random_tokens(7, (2, 6), 1), random_tokens(7, (2, 6), 2)
    (_, fast_loss, fast_grads), (_, loss, grads) = (forward_backward(m, idx, targets, 3) for m in models)
    assert_close(fast_loss, loss, "loss")
    assert fast_grads.keys() == grads.keys() == models[0].trainable_params().keys()
    for name in grads:
        assert_close(fast_grads[name], grads[name], name)


def test_cached_decoding_agrees():
    config = GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=8)
    models = [model.eval() for model in both_models(config, seed=2)]
    prompt = random_tokens(11, (2, 5), 0)
    logits = []
    for model in models:
        kv_cache = model.new_kv_cache(2)
        steps = [model.decode(prompt, kv_cache)]
        for t in range(4):
            steps.append(model.decode(numpy.full((2, 1), t), kv_cache))
        logits.append(numpy.stack(steps))
    assert_close(logits[0], logits[1], "decoded logits")


def test_baby_trains_to_the_same_losses_on_both_readings():
    """200 float32 steps of the baby shape (batch 4): the loss curves agree within 1e-5 relative.

    Both runs start from the same weights and see the same batches; they differ only in
    float32 rounding (the fast layers sum in other orders), which AdamW carries from step
    to step. The largest relative difference measured over the 200 steps was 1.4e-7, about
    one float32 rounding; a wrong term in any layer moves the losses by far more than 1e-5.
    One BLAS thread: the steps are small, and BLAS threads that spin beside other busy
    processes made them ten times slower.
    """
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    cfg = TrainConfig(lr=1e-3, warmup_iters=20, lr_decay_iters=200)
    data = numpy.random.default_rng(0).integers(0, config.vocab_size, 20_000)
    data[1::3] = (data[::3][: len(data[1::3])] * 7 + 1) % config.vocab_size  # something to learn

    def batch(rng):
        starts = rng.integers(0, len(data) - config.block_size - 1, 4)
        idx = numpy.stack([data[s : s + config.block_size] for s in starts])
        return idx, numpy.stack([data[s + 1 : s + 1 + config.block_size] for s in starts])

    curves = []
    for reference in (False, True):
        model = GPT(config, seed=0, dtype="float32", reference=reference)
        optimizer = AdamW(model.params, lr=cfg.lr, reference=reference)
        watch = NonfiniteWatch("cpu", model.dtype, out_dir=None)
        with threadpool_limits(1, user_api="blas"):
            curves.append([float(train_step(model, optimizer, batch, step, cfg, watch)[0]) for step in range(200)])
    fast_curve, reference_curve = map(numpy.array, curves)
    assert fast_curve[-1] < 0.85 * fast_curve[0]  # it learned something: the comparison is not of two flat lines
    numpy.testing.assert_allclose(fast_curve, reference_curve, rtol=1e-5)


def test_the_switch_picks_the_layers():
    config = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = GPT(config)
    assert model.layers is fast
    model.reference = True
    assert model.layers.attention.__name__ == "minillm.layers.attention"
    assert finetune.with_lora(model, 1).reference and model.replica().reference
