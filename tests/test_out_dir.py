"""The out dir: one run at a time (a lock that even kill -9 releases), and clear errors when it cannot be used."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minillm import checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
        "--eval-iters", "1", "--sample-tokens", "4", "--device", "cpu", "--threads", "1"]


def command(*flags):
    return [sys.executable, "train.py", *TINY, *flags]


def run_train(*flags):
    return subprocess.run(command(*flags), cwd=ROOT, capture_output=True, text=True)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="file locks need fcntl")
def test_a_second_run_on_the_same_out_dir_is_refused_and_kill_9_releases_the_lock(tmp_path):
    first = subprocess.Popen(command("--out-dir", str(tmp_path), "--max-iters", "100000", "--eval-interval", "100000"),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / checkpoint.LOCK_FILE
        wait_for(lambda: lock.is_file() and lock.read_text() == str(first.pid))
        second = run_train("--out-dir", str(tmp_path), "--max-iters", "2")
        assert second.returncode == 1
        assert second.stderr == (
            f"train.py: error: the out dir {tmp_path} is in use by another training run (process {first.pid}); "
            "wait for it to finish or choose another --out-dir\n"
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_train("--out-dir", str(tmp_path), "--max-iters", "2")
    assert third.returncode == 0, third.stderr


def test_an_out_dir_that_cannot_be_created_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    result = run_train("--out-dir", str(blocker / "run"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"train.py: error: cannot create the out dir {blocker / 'run'}")
    assert result.stderr.count("\n") == 1
