"""Fine-tuning: frozen parameters stay put, LoRA merges exactly, completion-only loss, early stopping, JSONL errors.

Model-level properties are checked on tiny float64 models; the training options
end to end on a tiny checkpoint pretrained in this module (a few hundred ms per run).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from helpers import random_tokens, tiny_model
from hypothesis import given, settings, strategies as st

from minillm import checkpoint, evaluate, finetune, sft, tasks, training
from minillm.errors import ConfigError
from minillm.layers import linear
from minillm.layers.cross_entropy import IGNORE_INDEX
from minillm.tokenizers.char import CharTokenizer
from minillm.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=8, max_iters=8, warmup_iters=2, lr_decay_iters=8,
    eval_interval=4, eval_iters=2, save_interval=4, log_interval=4, sample_tokens=4, device="cpu", threads=1,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny checkpoint of the built-in corpus, whose characters cover the addition task."""
    directory = tmp_path_factory.mktemp("pretrained")
    train(TrainConfig(out_dir=str(directory), **TINY))
    return directory / "ckpt.npz"


def fine_tune(pretrained, out_dir, **options):
    return train(TrainConfig(init_from=str(pretrained), out_dir=str(out_dir), **(TINY | options)))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- the model: frozen parameters and LoRA -----------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(frozen_blocks=st.integers(0, 2), embeddings=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_frozen_parameters_get_no_gradient_and_the_others_are_unchanged(frozen_blocks, embeddings, bias, seed):
    model = tiny_model(n_layer=2, bias=bias, seed=seed)
    idx, targets = random_tokens(7, (2, 5), seed), random_tokens(7, (2, 5), seed + 1)
    model(idx, targets)
    full = model.backward()
    model.frozen = {name for name in model.params if any(name.startswith(f"h.{i}.") for i in range(frozen_blocks))}
    if embeddings:
        model.frozen |= {"wte.weight", "wpe.weight"}
    model(idx, targets)
    partial = model.backward()
    assert partial.keys() == model.params.keys() - model.frozen
    for name, grad in partial.items():
        assert numpy.array_equal(grad, full[name]), name


def test_frozen_linear_layers_skip_their_weight_gradient():
    x, w, b = (numpy.random.default_rng(0).normal(size=shape) for shape in ((3, 4), (4, 5), (5,)))
    _, cache = linear.forward(x, w, b)
    dout = numpy.ones((3, 5))
    dx, dw, db = linear.backward(dout, cache, weight_grads=False)
    assert dw is None and db is None
    assert numpy.array_equal(dx, linear.backward(dout, cache)[0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("targets", ["attn", "mlp", "attn,mlp"])
def test_lora_starts_as_the_base_model_and_merges_to_identical_logits(dtype, targets):
    base = tiny_model(dtype=dtype, n_layer=2).eval()
    idx = random_tokens(7, (3, 5), 0)
    adapted = finetune.with_lora(base, 2, alpha=4.0, targets=targets, seed=1)
    assert numpy.array_equal(adapted(idx)[0], base(idx)[0])  # b = 0: nothing changed yet
    assert set(adapted.trainable_params()) == {
        f"{layer}.{kind}" for layer in finetune.adapted_layers(adapted.config) for kind in ("lora_a", "lora_b")
    }
    for name, p in adapted.params.items():  # as if trained: every adapter non-zero
        if name.endswith("lora_b"):
            p[...] = numpy.random.default_rng(2).normal(size=p.shape)
    merged = finetune.merged(adapted)
    assert merged.config.lora_rank == 0 and merged.params.keys() == base.params.keys()
    assert not numpy.array_equal(adapted(idx)[0], base(idx)[0])
    assert numpy.array_equal(merged(idx)[0], adapted(idx)[0])
    # Sampling's cached decoding uses the adapted weights too.
    kv_cache = adapted.new_kv_cache(3)
    assert numpy.allclose(adapted.decode(idx, kv_cache), adapted(idx)[0][:, -1], rtol=1e-5, atol=1e-6)


def test_bad_lora_options_are_config_errors():
    model = tiny_model()
    with pytest.raises(ConfigError, match="lora_targets"):
        finetune.with_lora(model, 2, targets="attn,ffn")
    with pytest.raises(ConfigError, match="already has LoRA"):
        finetune.with_lora(finetune.with_lora(model, 2), 2)


# -- prompt/completion data ---------------------------------------------------------------------


def test_completion_only_loss_equals_the_loss_over_completion_tokens_computed_by_hand():
    tokenizer = CharTokenizer.from_text("ab=c\n")
    examples = [(1, "ab=", "c"), (2, "a=", "bc")]
    x, y = sft.collate(sft.encode(examples, tokenizer, block_size=8, source="hand"))
    enc = tokenizer.encode
    ignored = IGNORE_INDEX
    # "ab=c\n": inputs a b = c, targets . . c \n; "a=bc\n": inputs a = b c, targets . b c \n.
    assert x.tolist() == [enc("ab=c"), enc("a=bc")]
    assert y.tolist() == [[ignored, ignored, *enc("c\n")], [ignored, *enc("bc\n")]]

    model = tiny_model(vocab_size=tokenizer.vocab_size, block_size=8)
    logits, loss = model(x, y)
    log_probs = logits - numpy.log(numpy.exp(logits).sum(axis=-1, keepdims=True))
    picked = [log_probs[b, t, y[b, t]] for b in range(2) for t in range(x.shape[1]) if y[b, t] != IGNORE_INDEX]
    assert len(picked) == 2 + 3  # "c\n" and "bc\n"
    assert float(loss) == pytest.approx(-numpy.mean(picked), rel=1e-12)


def test_padding_does_not_change_a_rows_logits():
    model = tiny_model(block_size=6)
    short, long = [1, 2, 3], [4, 5, 6, 1, 2]
    padded = numpy.array([short + [0, 0], long])
    assert numpy.allclose(model(padded)[0][0, :3], model(numpy.array([short]))[0][0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], 'line 2: the field "completion" is missing'),
    (['{"prompt": "a", "completion": "b"}', "", '{"prompt": "a", "completion": "b"', "x"], "line 3: not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', '["a", "b"]'], "line 2: expected an object"),
    (['{"prompt": 1, "completion": "b"}'], 'line 1: the field "prompt" is not a string'),
    (['{"prompt": "a", "completion": ""}'], "line 1: the completion is empty"),
    (['{"prompt": "a", "completion": "b"}'], "1 example"),
])
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(sft.SFTError, match=message):
        sft.read_jsonl(path)


def test_examples_longer_than_the_context_or_with_unknown_characters_name_the_line():
    tokenizer = CharTokenizer.from_text("ab\n")
    with pytest.raises(sft.SFTError, match=r"line 2: the prompt, completion and end token are 7 tokens"):
        sft.encode([(1, "a", "b"), (2, "aaaa", "bb")], tokenizer, block_size=5, source="f.jsonl")
    with pytest.raises(sft.SFTError, match=r"f.jsonl line 1: .*'z'"):
        sft.encode([(1, "z", "b")], tokenizer, block_size=5, source="f.jsonl")


def test_addition_task_is_deterministic_correct_and_holds_out_its_test_problems():
    train_pairs, test_pairs = tasks.addition("train"), tasks.addition("test")
    assert len(train_pairs) == 20_000 and len(test_pairs) == 1_000
    assert train_pairs == tasks.addition("train")
    assert not {p for p, _ in train_pairs} & {p for p, _ in test_pairs}
    for prompt, completion in train_pairs[:100] + test_pairs[:100]:
        a, b = map(int, prompt.rstrip("=").split("+"))
        assert 10 <= a <= 999 and 10 <= b <= 999 and completion == str(a + b)


# -- the training options, end to end ------------------------------------------------------------


def test_freezing_keeps_frozen_parameters_and_gives_them_no_optimizer_state(pretrained, tmp_path):
    fine_tune(pretrained, tmp_path, freeze_embeddings=True, freeze_blocks=1)
    before, _ = checkpoint.read_arrays(pretrained)
    after, _ = checkpoint.read_arrays(tmp_path / "last.npz")
    frozen = [n for n in before
              if n.startswith("params/") and (n.startswith("params/h.0.") or "wte" in n or "wpe" in n)]
    trained = [n for n in before if n.startswith("params/") and n not in frozen]
    assert all(numpy.array_equal(before[n], after[n]) for n in frozen)
    assert not any(numpy.array_equal(before[n], after[n]) for n in trained if n.endswith("weight"))
    assert {n.removeprefix("adam_m/") for n in after if n.startswith("adam_m/")} == {
        n.removeprefix("params/") for n in trained
    }


def test_lora_fine_tune_trains_only_adapters_resumes_exactly_and_merges(pretrained, tmp_path):
    options = dict(sft="addition", lora_rank=2, lora_targets="attn,mlp", merge_lora=True)
    fine_tune(pretrained, tmp_path / "whole", **options)
    fine_tune(pretrained, tmp_path / "halves", **(options | dict(max_iters=4)))
    fine_tune(pretrained, tmp_path / "halves", resume=True, **options)
    whole, _ = checkpoint.read_arrays(tmp_path / "whole" / "last.npz")
    halves, _ = checkpoint.read_arrays(tmp_path / "halves" / "last.npz")
    assert whole.keys() == halves.keys()
    assert all(numpy.array_equal(whole[n], halves[n]) for n in whole)

    base, _ = checkpoint.read_arrays(pretrained)
    assert all(numpy.array_equal(base[n], whole[n]) for n in base if n.startswith("params/"))
    assert {n for n in whole if n.startswith("adam_m/")} == {
        n.replace("params/", "adam_m/") for n in whole if n.startswith("params/") and n.endswith(("lora_a", "lora_b"))
    }
    adapted, *_ = checkpoint.load(tmp_path / "whole" / "ckpt.npz")
    merged, *_ = checkpoint.load(tmp_path / "whole" / "merged.npz")
    assert merged.config.lora_rank == 0
    idx = random_tokens(adapted.config.vocab_size, (2, 10), 0)
    assert numpy.array_equal(merged.eval()(idx)[0], adapted.eval()(idx)[0])


def test_early_stopping_stops_at_the_patience_th_evaluation_without_improvement(pretrained, tmp_path, monkeypatch):
    # (train, val) per evaluation at steps 0, 2, 4, ...: the best val is at step 2, then two worse ones.
    losses = iter([3.0, 2.0, 2.9, 1.5, 2.8, 1.6, 2.7, 1.7, 2.6, 1.0])
    monkeypatch.setattr(training, "estimate_loss", lambda *args: next(losses))
    fine_tune(pretrained, tmp_path, patience=2, eval_interval=2, max_iters=20)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "val_loss" in entry] == [0, 2, 4, 6]
    assert checkpoint.read_meta(tmp_path / "ckpt.npz")["step"] == 2
    assert checkpoint.read_meta(tmp_path / "last.npz")["step"] == 6


def test_fine_tuning_options_without_a_pretrained_model_are_usage_errors(tmp_path):
    for options in (dict(lora_rank=2), dict(freeze_blocks=1), dict(merge_lora=True)):
        with pytest.raises(ConfigError, match="--init-from"):
            train(TrainConfig(out_dir=str(tmp_path), **(TINY | options)))


def test_freezing_everything_or_more_blocks_than_exist_is_a_usage_error(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="exceeds the model's 2 blocks"):
        fine_tune(pretrained, tmp_path, freeze_blocks=3)


def test_sft_characters_missing_from_the_pretrained_vocabulary_are_named_with_their_line(pretrained, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl",
                       [{"prompt": "1+1=", "completion": "2"}, {"prompt": "§", "completion": "2"}])
    result = subprocess.run(
        [sys.executable, "train.py", "--init-from", str(pretrained), "--sft", str(path), "--out-dir", str(tmp_path),
         "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "line 2" in result.stderr and "'§'" in result.stderr


def test_evaluate_scores_exact_matches_of_a_memorised_task(tmp_path):
    pairs = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in ((12, 30), (45, 67), (80, 19))]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs + pairs)  # the second half is the val split
    train(TrainConfig(sft=str(path), out_dir=str(tmp_path), **(TINY | dict(max_iters=150, lr=1e-2, eval_interval=150))))
    result = subprocess.run([sys.executable, "-m", "minillm.evaluate", "--ckpt", str(tmp_path / "ckpt.npz"),
                             "--data", str(path), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "exact match: 6 / 6 = 100.0%" in result.stdout

    model, tokenizer, _, _ = checkpoint.load(tmp_path / "ckpt.npz")
    right, wrong = evaluate.exact_match(model.eval(), tokenizer, [("12+30=", "43"), ("45+67=", "112")])
    assert right == 1 and wrong == [("12+30=", "43", "42")]


# -- characters the vocabulary lacks ------------------------------------------------------------


def test_text_with_new_characters_names_the_way_forward(pretrained, tmp_path):
    text = write_text(tmp_path / "new.txt", "cost: $5 `x` " * 200)
    with pytest.raises(ValueError, match=r"not in the .*vocabulary.*--extend-vocab"):
        fine_tune(pretrained, tmp_path / "run", data=str(text))


def test_extend_vocab_adds_rows_and_keeps_the_old_tokens_logits(pretrained, tmp_path):
    model, tokenizer, _, _ = checkpoint.load(pretrained)
    text = "cost: $5 `x` " * 200
    extended, bigger, added = training.extend_vocabulary(model, tokenizer, text, seed=0)
    assert added == sorted(set(text) - set(tokenizer.chars)) and added
    assert bigger.chars[: tokenizer.vocab_size] == tokenizer.chars and bigger.vocab_size == extended.config.vocab_size
    idx = numpy.array([tokenizer.encode("the cost")])
    old_logits, _ = model.eval()(idx)
    new_logits, _ = extended.eval()(idx)
    numpy.testing.assert_array_equal(new_logits[..., : tokenizer.vocab_size], old_logits)
    rows = extended.params["wte.weight"][tokenizer.vocab_size :]
    assert rows.shape == (len(added), model.config.n_embd) and 0.005 < rows.std() < 0.05

    out_dir = tmp_path / "run"
    fine_tune(pretrained, out_dir, data=str(write_text(tmp_path / "new.txt", text)), extend_vocab=True)
    tuned, tuned_tokenizer, _, _ = checkpoint.load(out_dir / "ckpt.npz")
    assert tuned.config.vocab_size == bigger.vocab_size and tuned_tokenizer.chars == bigger.chars
    assert tuned_tokenizer.encode("$") == [tokenizer.vocab_size + added.index("$")]


def test_extend_vocab_needs_trainable_embeddings_and_a_character_vocabulary(pretrained, tmp_path):
    for options in (dict(freeze_embeddings=True), dict(lora_rank=2)):
        with pytest.raises(ConfigError, match="--extend-vocab"):
            fine_tune(pretrained, tmp_path / "run", extend_vocab=True, **options)
    with pytest.raises(ConfigError, match="--extend-vocab"):
        train(TrainConfig(out_dir=str(tmp_path / "scratch"), extend_vocab=True, **TINY))


def write_text(path, text):
    path.write_text(text)
    return path


def test_sft_evaluations_show_answers_to_held_out_prompts(pretrained, tmp_path, capsys):
    fine_tune(pretrained, tmp_path / "run", sft="addition", max_iters=4)
    out = capsys.readouterr().out
    training_split = tasks.examples("addition", "train")
    held_out = training_split[-len(training_split) // 10 :][:training.HELD_OUT_SHOWN]  # the validation pairs
    for prompt, completion in held_out:
        assert out.count(f"    {prompt!r} -> ") == 3  # at steps 0 and 4, and from the best checkpoint
        assert f"(expected {completion!r})" in out
    assert "sample" not in out.replace("sample from it:", "")


def test_init_from_says_what_it_loaded(pretrained, tmp_path, capsys):
    model, tokenizer, _, _ = checkpoint.load(pretrained)
    fine_tune(pretrained, tmp_path / "run", max_iters=1)
    c = model.config
    assert (f"init from {pretrained}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} channels, context "
            f"{c.block_size}, {model.num_params():,} parameters, char vocabulary of {tokenizer.vocab_size}\n"
            ) in capsys.readouterr().out
