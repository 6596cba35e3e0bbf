"""Pretraining end to end: corpus, token files, checkpoints, exact resume (also after kill -9), log and plot."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from minillm import checkpoint, data, hf, prepare
from minillm.corpus import Corpus
from minillm.sampling import generate
from minillm.tokenizers.choice import Recipe
from minillm.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent

TINY = dict(
    n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, dropout=0.1,
    max_iters=12, warmup_iters=2, lr_decay_iters=12, eval_interval=6, eval_iters=2,
    save_interval=3, log_interval=4, sample_tokens=8, device="cpu",
)


def tiny_flags(**overrides):
    options = {**TINY, **overrides}
    flags = []
    for name, value in options.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def saved_arrays(path):
    arrays, meta = checkpoint.read_arrays(path)
    return arrays, meta


def test_builtin_corpus_is_deterministic_and_sorted_by_topic():
    from pydoc_data.topics import topics

    text = data.builtin_corpus()
    assert text == data.builtin_corpus()
    first, second = sorted(topics)[:2]
    assert text.startswith(topics[first] + "\n\n" + topics[second])
    assert len(text) > 400_000


def test_windows_stay_inside_their_split(tmp_path):
    from minillm.tokenizers.char import CharTokenizer

    text = "".join(chr(ord("a") + i % 26) for i in range(300))
    tokenizer = CharTokenizer.from_text(text)
    prepared = prepare.prepare(Corpus.from_text("letters", text), Recipe("char"), block_size=8, directory=tmp_path)
    train_tokens, val_tokens = prepared.train, prepared.val
    assert prepared.tokenizer.chars == tokenizer.chars
    assert len(train_tokens) == 270 and len(val_tokens) == 30
    assert numpy.array_equal(numpy.concatenate([train_tokens, val_tokens]), tokenizer.encode(text))
    rng = numpy.random.default_rng(0)
    for tokens in (train_tokens, val_tokens):
        x, y = data.get_batch(tokens, 200, 8, rng)
        # Every window is a contiguous slice of its own split, and y is x shifted by one.
        haystack = tokens.tobytes()
        for row_x, row_y in zip(x, y):
            assert numpy.array_equal(row_x[1:], row_y[:-1])
            window = numpy.append(row_x, row_y[-1]).astype(tokens.dtype).tobytes()
            assert window in haystack


def test_split_too_small_for_a_window_is_a_clear_error(tmp_path):
    text = "abcdefghij" * 5  # val split: 5 tokens
    with pytest.raises(data.DataError, match="val split has 5 tokens"):
        prepare.prepare(Corpus.from_text("letters", text), Recipe("char"), block_size=8, directory=tmp_path)


def test_train_saves_checkpoints_log_and_plot_and_samples(tmp_path, corpus):
    out = tmp_path / "out"
    train(TrainConfig(data=str(corpus), out_dir=str(out), **TINY))
    for name in ("ckpt.npz", "last.npz", "train.bin", "val.bin", "log.jsonl"):
        assert (out / name).is_file(), name
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [e for e in entries if "val_loss" in e]
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    assert all("grad_norm" in e for e in entries if "loss" in e)
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    _, meta = saved_arrays(out / "ckpt.npz")
    assert meta["val_loss"] == min(e["val_loss"] for e in evals)
    reloaded, tokenizer, _, _ = checkpoint.load(out / "ckpt.npz")
    ids = generate(reloaded, numpy.array([[0]]), 5, temperature=0)
    assert ids.shape == (1, 6)
    assert len(tokenizer.decode(ids[0])) == 6


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, corpus):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(TrainConfig(data=str(corpus), out_dir=str(straight), **TINY))
    train(TrainConfig(data=str(corpus), out_dir=str(split), **{**TINY, "max_iters": 7}))
    train(TrainConfig(data=str(corpus), out_dir=str(split), resume=True, **TINY))
    expected, meta = saved_arrays(straight / "last.npz")
    got, resumed_meta = saved_arrays(split / "last.npz")
    assert meta["step"] == resumed_meta["step"] == 12
    assert expected.keys() == got.keys()
    for name in expected:
        assert numpy.array_equal(expected[name], got[name]), name


def test_resuming_a_run_already_past_max_iters_evaluates_and_finishes(tmp_path, corpus):
    options = dict(data=str(corpus), out_dir=str(tmp_path), **TINY)
    train(TrainConfig(**options))
    model = train(TrainConfig(**{**options, "max_iters": 5}, resume=True))  # the run is at step 12
    assert model is not None
    _, meta = saved_arrays(tmp_path / "last.npz")
    assert meta["step"] == 12  # no step was taken


def run_train(flags, **kwargs):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *flags], capture_output=True, text=True, cwd=ROOT, **kwargs
    )


def count_step_lines(log):
    """Progress lines (one per log interval, and the first step of each run) in a run's log."""
    if not log.exists():
        return 0
    return sum('"loss"' in line for line in log.read_text().splitlines())


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_parameters(tmp_path, corpus):
    # About 3 s of training, saved every 2 steps: each kill lands mid-run, often mid-save.
    flags = tiny_flags(max_iters=1000, lr_decay_iters=1000, eval_interval=250, save_interval=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_train(["--data", str(corpus), "--out-dir", str(straight), *flags])
    assert done.returncode == 0, done.stderr

    chooser = random.Random(0)
    log = killed / "log.jsonl"
    for _ in range(4):
        resume = ["--resume"] if (killed / "last.npz").exists() else []
        steps_before = count_step_lines(log)
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--data", str(corpus), "--out-dir", str(killed), *flags, *resume],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        # Kill at a random moment after training has begun (start-up time varies with the machine's load).
        while count_step_lines(log) <= steps_before:
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.02)
        time.sleep(chooser.uniform(0.0, 0.6))
        assert proc.poll() is None, "the run finished before it could be killed: make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if (killed / "last.npz").exists():
            checkpoint.read_arrays(killed / "last.npz")  # whatever the moment, the last save is whole
    finished = run_train(["--data", str(corpus), "--out-dir", str(killed), *flags, "--resume"])
    assert finished.returncode == 0, finished.stderr

    expected, _ = saved_arrays(straight / "last.npz")
    got, meta = saved_arrays(killed / "last.npz")
    assert meta["step"] == 1000
    for name in expected:
        assert numpy.array_equal(expected[name], got[name]), name


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, corpus):
    out = tmp_path / "out"
    flags = tiny_flags(max_iters=100_000, lr_decay_iters=100_000, eval_interval=100_000, save_interval=100_000)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--data", str(corpus), "--out-dir", str(out), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    deadline = time.time() + 60
    while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr  # 128 + SIGINT, as shells report an interrupted command
    assert "continue with --resume" in stdout
    assert "Traceback" not in stderr
    _, meta = saved_arrays(out / "last.npz")
    assert meta["step"] > 0


def test_nan_loss_stops_with_the_step_and_the_first_bad_gradient(tmp_path, corpus):
    result = run_train(["--data", str(corpus), "--out-dir", str(tmp_path), *tiny_flags(lr=1e30, grad_clip=0)])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("train.py: error: step ")
    assert "the loss is nan" in line or "first to be non-finite" in line
    checkpoint.read_arrays(tmp_path / "ckpt.npz")  # the step-0 best checkpoint is still loadable


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n-embd", "10", "--n-head", "3"], "divisible"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--device", "tpu"], "invalid choice"),
        (["--preset", "huge"], "invalid choice"),
        (["--beta2", "1.0"], "--beta2 must be in [0, 1)"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, corpus, flags, message):
    result = run_train(["--data", str(corpus), "--out-dir", str(tmp_path), *flags])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_and_flags_layer_over_the_preset(tmp_path):
    from minillm.train_cli import build_parser, resolve_config

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"n-layer": 3, "lr": 0.002}))
    args = build_parser().parse_args(["--preset", "small", "--config", str(config), "--lr", "0.005"])
    cfg = resolve_config(args)
    assert (cfg.n_embd, cfg.n_layer, cfg.lr) == (384, 3, 0.005)


def test_init_from_a_checkpoint_or_a_gpt2_directory_starts_from_those_weights(tmp_path, corpus):
    from minillm.model import GPT, GPTConfig
    from minillm.tokenizers.bpe import BPETokenizer

    pretrained = tmp_path / "pretrained"
    train(TrainConfig(data=str(corpus), out_dir=str(pretrained), **TINY))
    tuned = train(TrainConfig(data=str(corpus), out_dir=str(tmp_path / "tuned"), init_from=str(pretrained / "ckpt.npz"),
                              **{**TINY, "max_iters": 2, "eval_interval": 1}))
    _, start = saved_arrays(tmp_path / "tuned" / "last.npz")
    assert tuned.config.n_embd == TINY["n_embd"] and start["step"] == 2

    tokenizer = BPETokenizer.train(corpus.read_text()[:5000], 300)
    gpt2_dir = tmp_path / "gpt2"
    hf.save_pretrained(GPT(GPTConfig(tokenizer.vocab_size, 32, 1, 2, 8)), gpt2_dir, tokenizer)
    options = {**TINY, "max_iters": 2, "eval_interval": 1, "n_layer": 5}  # the model options are the directory's
    tuned = train(TrainConfig(data=str(corpus), out_dir=str(tmp_path / "bpe"), init_from=str(gpt2_dir), **options))
    assert tuned.config.n_layer == 1 and tuned.config.vocab_size == tokenizer.vocab_size

    too_long = run_train(["--data", str(corpus), "--out-dir", str(tmp_path / "x"), "--init-from", str(gpt2_dir),
                          *tiny_flags(block_size=64)])
    assert too_long.returncode == 2 and "exceeds the pretrained model's 32 positions" in too_long.stderr


def test_named_dataset_is_downloaded_once_checked_and_offline_is_a_clear_error(tmp_path, monkeypatch):
    import io
    import urllib.error

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    url, size = data.DATASETS["shakespeare"]
    calls = []

    def serve(body):
        def urlopen(address, timeout):
            calls.append(address)
            return io.BytesIO(body)
        return urlopen

    monkeypatch.setattr(data.urllib.request, "urlopen", serve(b"x" * (size - 1)))
    with pytest.raises(data.DataError, match="expected 1,115,394"):
        data.fetch_dataset("shakespeare")
    monkeypatch.setattr(data.urllib.request, "urlopen", serve(b"x" * size))
    path = data.fetch_dataset("shakespeare")
    assert path == tmp_path / "minillm" / "shakespeare.txt" and path.stat().st_size == size
    assert data.fetch_dataset("shakespeare") == path and calls == [url, url]  # the second call reads the cache

    def offline(address, timeout):
        raise urllib.error.URLError("no network")

    path.unlink()
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError, match="pass --data PATH"):
        data.fetch_dataset("shakespeare")


def test_evaluations_announce_themselves_and_sample_tokens_0_prints_no_sample(tmp_path, corpus, capsys):
    train(TrainConfig(**{**TINY, "sample_tokens": 0}, data=str(corpus), out_dir=str(tmp_path)))
    out = capsys.readouterr().out
    for step in (0, 6, 12):
        assert f"step {step}: evaluating (2 batches per split)\nstep {step}: train loss" in out
    assert "sample" not in out.replace("sample from it:", "")


def test_the_learning_rate_decays_until_max_iters_unless_told_otherwise():
    from dataclasses import replace

    from minillm.training import learning_rate

    cfg = TrainConfig(max_iters=300, warmup_iters=10, lr=1e-3, min_lr=1e-4)
    assert learning_rate(299, cfg) > cfg.min_lr and learning_rate(300, cfg) == cfg.min_lr
    assert learning_rate(300, replace(cfg, lr_decay_iters=600)) > cfg.min_lr
