"""The whole GPT's backward() matches central finite differences for every parameter, and so does the CLI.

Both readings of the layers are checked: the model on minillm.fast (the default) and on
minillm.layers (reference=True).

gradcheck.model_report (minillm.testing's rows, one per parameter) on hypothesis-drawn float64
configs (dropout on and off, with and without biases, one to three heads, sequence length 1,
vocabulary 2), after gradcheck.randomize; every parameter must be exact or ok.
The same holds for LoRA adapters (whose base weights are frozen, so the adapters are
what backward returns). `python -m minillm.gradcheck` must pass on a small model and
fail (exit 1) when the tolerance is impossible.
"""

import subprocess
import sys

import pytest
from helpers import random_tokens
from hypothesis import Phase, example, given, settings, strategies as st

from minillm import finetune, gradcheck
from minillm.model import GPT, GPTConfig


# n_embd >= 3 (so head size 1..3 with n_head = 3, 2..3 with 2, 3 with 1). With n_embd = 2
# every LayerNorm outputs +-1 up to eps, the gradients reaching the parameters below ln_f
# are ~1e-6 while the loss is ~1, and float64 finite differences cannot resolve them:
# for vocab 2, block 1, 1 layer, 1 head, no bias, seed 0, h.0.mlp.c_fc.weight's numeric
# gradient is off by 1.9e-6 (h = 1e-4) to 1.2e-5 (h = 1e-5) relative, while the analytic
# one agrees with an 80-bit long-double finite difference to 6e-10. (test_layers_grad.py
# checks LayerNorm at 1 and 2 features against closed forms.)
@st.composite
def configs(draw):
    n_head = draw(st.sampled_from([1, 2, 3]))
    return GPTConfig(
        vocab_size=draw(st.integers(2, 7)), block_size=draw(st.integers(1, 4)), n_layer=draw(st.integers(1, 2)),
        n_head=n_head, n_embd=n_head * draw(st.integers(-(-3 // n_head), 3)), dropout=draw(st.sampled_from([0.0, 0.1])),
        bias=draw(st.booleans()),
    )


def assert_ok_where_something_was_kept(report, config):
    """Every parameter exact or ok, except that with dropout on one may be unchecked (zero in both): a
    mask can drop all of a block's attention weights (at T = 1 there is one per head), and then the loss
    does not depend on that block's attention projections, so there is nothing to compare."""
    wrong = [row for row in report.failing if not (config.dropout and row.verdict == "unchecked")]
    assert not wrong and any(row.ok for row in report.rows), f"\n{report}"


# No shrinking: an example costs ~0.5 s, and shrinking a failure took ~5 minutes.
# test_layers_grad.py pins a wrong gradient down to the layer and shrinks it there.
@settings(max_examples=10, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(config=configs(), batch_size=st.integers(1, 2), data=st.data(), seed=st.integers(0, 2**16))
# Always checked, whatever is drawn: heads that attend over several positions, in two layers, with
# dropout on (data=None: T is the whole block).
@example(config=GPTConfig(vocab_size=5, block_size=3, n_layer=2, n_head=2, n_embd=4, dropout=0.1, bias=True),
         batch_size=2, data=None, seed=0)
@example(config=GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=3, n_embd=6, dropout=0.1, bias=False),
         batch_size=1, data=None, seed=1)
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_model_gradients_match_finite_differences(reference, config, batch_size, data, seed):
    """The whole model's gradients, every parameter, against finite differences."""
    T = config.block_size if data is None else data.draw(st.integers(1, config.block_size), label="T")
    model = GPT(config, seed=seed, dtype="float64", reference=reference)
    gradcheck.randomize(model.params, seed)
    idx = random_tokens(config.vocab_size, (batch_size, T), seed)
    targets = random_tokens(config.vocab_size, (batch_size, T), seed + 1)
    report = gradcheck.model_report(model, idx, targets, dropout_seed=seed)
    assert [row.name for row in report.rows] == list(model.params)
    assert_ok_where_something_was_kept(report, config)


@settings(max_examples=6, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(config=configs(), rank=st.integers(1, 3), targets=st.sampled_from(["attn", "mlp", "attn,mlp"]),
       seed=st.integers(0, 2**16))
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_lora_adapter_gradients_match_finite_differences(reference, config, rank, targets, seed):
    model = GPT(config, seed=seed, dtype="float64", reference=reference)
    model = finetune.with_lora(model, rank, alpha=2.0, targets=targets, seed=seed)
    gradcheck.randomize(model.params, seed)  # b != 0, so that a's gradient is not zero
    idx = random_tokens(config.vocab_size, (2, config.block_size), seed)
    targets_ids = random_tokens(config.vocab_size, (2, config.block_size), seed + 1)
    report = gradcheck.model_report(model, idx, targets_ids, dropout_seed=seed)
    names = [row.name for row in report.rows]
    assert names and all(name.endswith((".lora_a", ".lora_b")) for name in names)
    assert len(names) == 2 * len(finetune.adapted_layers(model.config))
    assert_ok_where_something_was_kept(report, config)


def run_gradcheck(*flags):
    small = ["--vocab-size", "5", "--block-size", "3", "--n-layer", "1", "--n-embd", "6", "--batch-size", "1"]
    return subprocess.run([sys.executable, "-m", "minillm.gradcheck", *small, *flags], capture_output=True, text=True)


def test_gradcheck_command_passes_and_can_fail():
    passing = run_gradcheck()
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert " 0 failed" in passing.stdout
    failing = run_gradcheck("--tolerance", "1e-30")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert " 0 failed" not in failing.stdout and "WRONG" in failing.stdout
    adapters = run_gradcheck("--lora-rank", "2")
    assert adapters.returncode == 0 and "lora_b" in adapters.stdout, adapters.stdout + adapters.stderr
    reference = run_gradcheck("--reference")
    assert reference.returncode == 0 and " 0 failed" in reference.stdout, reference.stdout + reference.stderr
