"""The out dir: one run at a time (a lock that even kill -9 releases), and clear errors when it cannot be used."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_a_second_run_is_refused_until_the_holder_is_killed

from minillm import checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
        "--eval-iters", "1", "--sample-tokens", "4", "--device", "cpu", "--threads", "1"]


def command(*flags):
    return [sys.executable, "train.py", *TINY, *flags]


def run_train(*flags):
    return subprocess.run(command(*flags), cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="file locks need fcntl")
def test_a_second_run_on_the_same_out_dir_is_refused_and_kill_9_releases_the_lock(tmp_path):
    assert_a_second_run_is_refused_until_the_holder_is_killed(["train.py", *TINY, "--out-dir", str(tmp_path)], tmp_path,
                                                              timeout=30.0)


def test_an_out_dir_that_cannot_be_created_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    result = run_train("--out-dir", str(blocker / "run"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"train.py: error: cannot create the out dir {blocker / 'run'}")
    assert result.stderr.count("\n") == 1


def tiny_config(out_dir, **overrides):
    from minillm.training import TrainConfig

    options = dict(n_layer=1, n_head=1, n_embd=8, block_size=8, batch_size=2, eval_iters=1, sample_tokens=4,
                   device="cpu", threads=1, max_iters=4, warmup_iters=1, eval_interval=2, save_interval=2,
                   log_interval=1, data=str(CORPUS), out_dir=str(out_dir))
    return TrainConfig(**{**options, **overrides})


CORPUS = ROOT / "README.md"


def files_of(folder):
    """{relative path: (bytes, mtime)} of every file under folder."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def log_entries(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def test_a_new_run_into_another_runs_out_dir_is_refused_and_touches_nothing(tmp_path, capsys):
    from minillm import train_cli

    assert train_cli.main(["--config", write_config(tmp_path, tiny_config(tmp_path / "run"))]) == 0
    before = files_of(tmp_path / "run")
    assert ".lock" not in before  # a finished run leaves no lock file behind
    second = tiny_config(tmp_path / "run", max_iters=2, seed=7)
    assert train_cli.main(["--config", write_config(tmp_path, second)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    for named in (f"--out-dir {tmp_path / 'run'}", "--resume", "--overwrite", "ckpt.npz"):
        assert named in error
    assert files_of(tmp_path / "run") == before


def test_overwrite_starts_a_new_log_and_a_resume_continues_its_own_without_repeats(tmp_path):
    from minillm.training import train

    out_dir = tmp_path / "run"
    train(tiny_config(out_dir, max_iters=6))
    train(tiny_config(out_dir, max_iters=4, seed=3, overwrite=True))
    fresh = log_entries(out_dir)
    assert max(entry["step"] for entry in fresh) == 4  # nothing of the first run's steps 5 and 6
    train(tiny_config(out_dir, max_iters=8, seed=3, resume=True))
    resumed = log_entries(out_dir)
    assert resumed[: len(fresh)] == fresh
    for kind in ("loss", "val_loss"):
        steps = [entry["step"] for entry in resumed if kind in entry]
        assert steps == sorted(set(steps)), f"repeated or unordered {kind} steps: {steps}"
    assert [e["step"] for e in resumed if "val_loss" in e] == [0, 2, 4, 6, 8]


def test_resume_keeps_only_the_log_lines_from_before_the_saved_step(tmp_path):
    from minillm.progress import lines_before

    log = tmp_path / "log.jsonl"
    entries = [{"step": 0, "val_loss": 3}, {"step": 1, "loss": 3}, {"step": 2, "loss": 2},
               {"step": 2, "val_loss": 2}, {"step": 3, "loss": 1}]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"step": 4, "lo')
    kept = [json.loads(line) for line in lines_before(log, 2)]
    assert kept == entries[:3]  # the evaluation at step 2 and what followed are done again


def test_leftovers_of_a_killed_save_are_removed_and_links_are_never_followed(tmp_path):
    from minillm.training import train

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    leftover = out_dir / ".last.npz.k2j3h4.tmp"
    leftover.write_bytes(b"\0" * 1000)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (out_dir / "log.jsonl").symlink_to(target)
    train(tiny_config(out_dir, max_iters=2))
    assert not leftover.exists()
    assert target.read_text() == "keep me"
    assert not (out_dir / "log.jsonl").is_symlink() and log_entries(out_dir)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="file locks need fcntl")
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    from minillm.training import train

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (out_dir / checkpoint.LOCK_FILE).symlink_to(target)
    with pytest.raises(checkpoint.CheckpointError, match="is a symbolic link"):
        train(tiny_config(out_dir, max_iters=2))
    assert target.read_text() == "keep me"


def test_a_resume_whose_best_checkpoint_is_gone_writes_a_new_one(tmp_path):
    from minillm.training import train

    out_dir = tmp_path / "run"
    train(tiny_config(out_dir, max_iters=4))
    (out_dir / "ckpt.npz").unlink()
    # lr 1e-9: no evaluation of the resumed run beats the best val loss recorded in last.npz
    model = train(tiny_config(out_dir, max_iters=6, resume=True, lr=1e-9, min_lr=0.0))
    assert model is not None and (out_dir / "ckpt.npz").is_file()


def write_config(folder, cfg):
    """A --config file of the options where cfg differs from the defaults."""
    from dataclasses import asdict

    from minillm.training import TrainConfig

    defaults = asdict(TrainConfig())
    path = Path(folder) / "config.json"
    path.write_text(json.dumps({k: v for k, v in asdict(cfg).items() if v != defaults[k]}))
    return str(path)
