"""A new user's second hour: resuming a complete run, a resume with other model options, a resume into a
folder in use, and a resume on another machine (its threads and device decided there, also for a checkpoint of
an older version, which saved them with the run's options)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm import checkpoint, system, train_cli
from minillm.options import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--eval-interval", "10",
        "--sample-tokens", "0", "--eval-iters", "1", "--batch-size", "2"]


def train(corpus, out_dir, *flags):
    return subprocess.run([sys.executable, "train.py", *TINY, "--data", str(corpus), "--out-dir", str(out_dir),
                           *flags], cwd=ROOT, capture_output=True, text=True)


def test_resuming_a_complete_run_says_so_at_once_and_how_to_continue(corpus, tmp_path):
    first = train(corpus, tmp_path, "--max-iters", "20", "--device", "cpu", "--threads", "1")
    assert first.returncode == 0, first.stderr
    log = (tmp_path / "log.jsonl").read_bytes()
    again = train(corpus, tmp_path, "--resume")
    assert again.returncode == 0, again.stderr
    assert again.stdout == (
        f"the run in {tmp_path} is complete at step 20 (--max-iters 20); to train it further, resume with a "
        "larger --max-iters, for example --resume --max-iters 40\n"
    )
    assert (tmp_path / "log.jsonl").read_bytes() == log  # nothing evaluated or logged


def test_a_resume_with_other_model_options_names_them(corpus, tmp_path):
    first = train(corpus, tmp_path, "--max-iters", "10", "--device", "cpu", "--threads", "1")
    assert first.returncode == 0, first.stderr
    again = train(corpus, tmp_path, "--resume", "--max-iters", "20", "--n-layer", "2", "--n-embd", "32")
    assert again.returncode == 2  # a usage error
    assert again.stderr == (
        "train.py: error: the checkpoint's model differs from the options given (--n-embd 16 saved, 32 given, "
        "--n-layer 1 saved, 2 given); resume with the options of that run\n"
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="file locks need fcntl")
def test_a_resume_into_an_out_dir_in_use_says_so(corpus, tmp_path):
    with checkpoint.exclusive(tmp_path):  # another run, before its first save of last.npz
        result = train(corpus, tmp_path, "--resume", "--max-iters", "20")
    assert result.returncode == 1
    assert result.stderr == (
        f"train.py: error: the out dir {tmp_path} is in use by another training run (process {os.getpid()}); "
        "wait for it to finish or choose another --out-dir\n"
    )


def test_a_resume_takes_its_threads_from_this_machine_unless_given(corpus, tmp_path):
    first = train(corpus, tmp_path, "--max-iters", "10", "--device", "cpu", "--threads", "1")
    assert first.returncode == 0, first.stderr
    assert "cpu (float32, 1 thread)" in first.stdout
    cores = system.usable_cores()
    again = train(corpus, tmp_path, "--resume", "--max-iters", "20", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert f"cpu (float32, {cores} thread{'' if cores == 1 else 's'})" in again.stdout
    assert "threads" not in checkpoint.read_meta(tmp_path / "last.npz")["train_config"]
    given = train(corpus, tmp_path, "--resume", "--max-iters", "30", "--device", "cpu", "--threads", "1")
    assert given.returncode == 0, given.stderr
    assert "cpu (float32, 1 thread)" in given.stdout


def test_a_resume_of_an_older_checkpoint_ignores_the_threads_and_device_it_saved(corpus, tmp_path):
    first = train(corpus, tmp_path, "--max-iters", "10", "--device", "cpu", "--threads", "1")
    assert first.returncode == 0, first.stderr
    last = tmp_path / "last.npz"
    model, tokenizer, meta, optimizer_state = checkpoint.load(last)
    written_by_save = ("format", "version", "config", "dtype", "tokenizer", "optimizer_step")
    older = {name: value for name, value in meta.items() if name not in (*written_by_save, "ran_on")}
    older["train_config"] |= {"threads": 1, "device": "cpu"}  # as versions before ran_on wrote it
    checkpoint.save(last, model, tokenizer, optimizer_state=optimizer_state, **older)

    def resumed(*flags):
        args = train_cli.build_parser().parse_args(["--resume", "--out-dir", str(tmp_path), *flags])
        return train_cli.resolve_config(args)

    cfg, defaults = resumed(), TrainConfig()
    assert (cfg.threads, cfg.device) == (defaults.threads, defaults.device)  # threads 0: decided on this machine
    assert (cfg.max_iters, cfg.n_layer, cfg.batch_size) == (10, 1, 2)  # the run's own options still come back
    assert resumed("--threads", "1").threads == 1
    assert resumed("--device", "cpu").device == "cpu"
