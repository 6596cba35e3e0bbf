"""Helpers shared by the test modules: small models, random tokens, and the out dir's lock as a user meets it."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy

from minillm import checkpoint, gradcheck
from minillm.model import GPT, GPTConfig


def tiny_model(dtype="float64", seed=0, randomize=True, **config):
    """A small GPT; with `randomize`, weights ~ N(0, 0.5^2) (no unit gains or zero biases)."""
    options = dict(vocab_size=7, block_size=5, n_layer=1, n_head=2, n_embd=6) | config
    model = GPT(GPTConfig(**options), seed=seed, dtype=dtype)
    if randomize:
        gradcheck.randomize(model.params, seed)
    return model


def random_tokens(vocab_size, shape, seed):
    return numpy.random.default_rng(seed).integers(0, vocab_size, size=shape)


def assert_a_second_run_is_refused_until_the_holder_is_killed(train, out_dir, env=None, encoding="utf-8",
                                                              timeout=60.0):
    """While `python *train` (a train.py run into out_dir) holds the lock, the same run is refused in one line
    naming the holder; once the holder is killed with SIGKILL, a run with --overwrite goes ahead. `encoding`:
    what the runs write to their standard streams (in `env`). Returns the lock's path."""
    root = Path(__file__).resolve().parent.parent
    run = lambda *flags: subprocess.run([sys.executable, *train, *flags], cwd=root, env=env, capture_output=True,
                                        encoding=encoding, errors="replace")
    first = subprocess.Popen([sys.executable, *train, "--max-iters", "100000", "--eval-interval", "100000"],
                             cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = Path(out_dir) / checkpoint.LOCK_FILE
    try:
        deadline = time.monotonic() + timeout
        while not (lock.is_file() and lock.read_text(encoding="utf-8") == str(first.pid)):
            assert first.poll() is None, "the first run ended before taking the lock"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
        second = run("--max-iters", "2")
        assert second.returncode == 1
        assert second.stderr == (
            f"train.py: error: the out dir {out_dir} is in use by another training run (process {first.pid}); "
            "wait for it to finish or choose another --out-dir\n"
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run("--max-iters", "2", "--overwrite")
    assert third.returncode == 0, third.stderr
    return lock
