"""A run loses no work to how it ends: a reader of its output that goes away (`| head`, a closed terminal),
a standard output closed from the start, a second Ctrl-C at any moment, a chain of kill -9 and --resume."""

import json
import os
import pty
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from minillm import checkpoint, training
from minillm.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--eval-interval", "20",
        "--sample-tokens", "20", "--threads", "1", "--device", "cpu"]
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def command(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args)]


def train_flags(corpus, out, max_iters=60, *more):
    return ["--data", corpus, "--out-dir", out, "--max-iters", max_iters, *TINY, *more]


def log_entries(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_finished(out, max_iters):
    """The run went to its end: both checkpoints whole, and the log holds the last evaluation."""
    for name in ("ckpt.npz", "last.npz"):
        _, meta = checkpoint.read_arrays(out / name)
        assert meta["step"] == max_iters
    last = log_entries(out)[-1]
    assert last["step"] == max_iters and "val_loss" in last


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("trained")
    done = subprocess.run(command("train.py", *train_flags(corpus, out)), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    return out


# ---------------------------------------------------------------- standard output goes away


def test_training_outlives_a_reader_that_goes_away(tmp_path, corpus):
    out = tmp_path / "out"
    proc = subprocess.Popen(command("train.py", *train_flags(corpus, out, 200)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    for _ in range(3):  # what `| head -3` reads before it exits
        assert proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 0, stderr
    assert stderr == ""
    assert_finished(out, 200)
    assert sum("loss" in entry for entry in log_entries(out)) == 5  # steps 1, 50, 100, 150, 200: none dropped


def test_training_outlives_its_terminal_closing(tmp_path, corpus):
    """A closed terminal: SIGHUP, then writes to it fail with EIO (stderr a terminal too: the progress bar)."""
    out = tmp_path / "out"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(command("train.py", *train_flags(corpus, out, 400)), stdin=subprocess.DEVNULL,
                            stdout=terminal, stderr=terminal, env=ENV)
    os.close(terminal)
    shown = b""
    while b"step 20:" not in shown:
        shown += os.read(controller, 4096)
    os.close(controller)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) == 0
    assert_finished(out, 400)


def test_training_with_standard_output_closed_notes_it_in_one_line(tmp_path, corpus):
    out = tmp_path / "out"
    done = subprocess.run(["sh", "-c", 'exec "$0" "$@" >&-', *command("train.py", *train_flags(corpus, out))],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["train.py: note: standard output is closed; what would be printed there is "
                                        "dropped"]
    assert_finished(out, 60)


def test_sampling_with_standard_output_closed_is_a_one_line_error(trained):
    done = subprocess.run(["sh", "-c", 'exec "$0" "$@" >&-', *command("generate.py", "--ckpt", trained / "ckpt.npz")],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and "standard output is closed" in done.stderr, done.stderr


def test_sampling_stops_quietly_when_its_reader_goes_away(trained):
    proc = subprocess.Popen(command("generate.py", "--ckpt", trained / "ckpt.npz", "--max-new-tokens", 100_000),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout.read(10)
    proc.stdout.close()
    assert proc.communicate(timeout=120)[1] == b""
    assert proc.returncode == 1


# ---------------------------------------------------------------- a second Ctrl-C


def test_a_ctrl_c_during_a_save_waits_for_the_save(tmp_path, corpus, monkeypatch):
    """Each checkpoint write is interrupted in its middle: the first Ctrl-C asks for a stop, the second
    (during the save that stop makes) is a KeyboardInterrupt once that save is whole."""
    savez = numpy.savez

    def interrupted_savez(file, **arrays):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, between the write's first and last byte
        savez(file, **arrays)

    monkeypatch.setattr(numpy, "savez", interrupted_savez)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(corpus), out_dir=str(out), max_iters=60, n_layer=1, n_head=2, n_embd=16,
                          block_size=16, eval_interval=20, sample_tokens=20, threads=1, device="cpu"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    _, meta = checkpoint.read_arrays(out / "last.npz")
    assert meta["step"] == 0  # the first Ctrl-C came during the best checkpoint's save at step 0
    checkpoint.read_arrays(out / "ckpt.npz")


def test_a_ctrl_c_while_writing_acts_once_the_write_is_done():
    stopped = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stopped.append(signum))
    try:
        with training.ctrl_c_after_writing():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stopped == []
        assert stopped == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_at_any_moment_exits_130_with_one_line(tmp_path, corpus):
    for delay in (0.0, 0.001, 0.002, 0.003, 0.005, 0.01, 0.05):
        out = tmp_path / f"out{delay}"
        proc = subprocess.Popen(command("train.py", *train_flags(corpus, out, 600)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        for line in proc.stdout:  # about a third of the run
            if line.startswith("step 200:"):
                break
        proc.send_signal(signal.SIGINT)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode == 130, (delay, stderr)
        assert stderr in ("", "train.py: interrupted\n"), (delay, stderr)
        # A second Ctrl-C during a step stops before the stop's save; whatever was saved is whole.
        checkpoints = list(out.glob("*.npz"))
        assert out / "ckpt.npz" in checkpoints
        for path in checkpoints:
            checkpoint.read_arrays(path)
        assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]


# ---------------------------------------------------------------- kill -9 and --resume, again and again


def test_a_chain_of_kills_and_resumes_logs_each_step_once(tmp_path, corpus):
    """The resumed log holds the uninterrupted run's entries, each once and with the same numbers; its only
    other lines are the first step of each resumed run, which is always reported (as a run's first step is)."""
    flags = ["--save-interval", "10", "--log-interval", "10"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(command("train.py", *train_flags(corpus, straight, 300, *flags)), capture_output=True,
                          env=ENV)
    assert done.returncode == 0, done.stderr
    chooser, resumed_at = random.Random(0), set()
    for _ in range(5):
        resume = ["--resume"] if (killed / "last.npz").exists() else ["--overwrite"]
        proc = subprocess.Popen(command("train.py", *train_flags(corpus, killed, 300, *flags, *resume)),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        time.sleep(chooser.uniform(0.4, 1.2))
        proc.kill()
        found = re.search(r"resuming at step (\d+)", proc.communicate()[0])
        if found:
            resumed_at.add(int(found[1]))
    # On a busy machine every kill may come before the first save: then the last run starts afresh.
    last = ["--resume"] if (killed / "last.npz").exists() else ["--overwrite"]
    finished = subprocess.run(command("train.py", *train_flags(corpus, killed, 300, *flags, *last)),
                              capture_output=True, text=True, env=ENV)
    assert finished.returncode == 0, finished.stderr
    found = re.search(r"resuming at step (\d+)", finished.stdout)
    if found:
        resumed_at.add(int(found[1]))

    numbers = ("step", "loss", "grad_norm", "lr", "train_loss", "val_loss")
    described = lambda entry: tuple(entry.get(key) for key in numbers)
    expected, got = map(described, log_entries(straight)), list(map(described, log_entries(killed)))
    assert len(got) == len(set((step, loss is None) for step, loss, *_ in got))  # no step described twice
    extra = set(got) - set(expected)
    assert set(expected) <= set(got)
    assert {step for step, *_ in extra} <= {step + 1 for step in resumed_at}
