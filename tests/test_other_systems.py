"""The commands on a system that is not Linux, simulated: no fcntl (Windows' msvcrt locks instead), no /proc,
no sched_getaffinity, fchmod, O_NOFOLLOW or O_NONBLOCK, no `resource`, no glibc.

A sitecustomize.py on PYTHONPATH sets these conditions up in each command's process before
anything of minillm loads. Its stand-in msvcrt.locking takes a real POSIX record lock
underneath, so the Windows lock is exercised for what it promises: one run per out dir,
the holder's pid named, released when the holder is killed.
"""

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers import assert_a_second_run_is_refused_until_the_holder_is_killed

from minillm import checkpoint, data, system

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
        "--eval-iters", "1", "--sample-tokens", "20", "--device", "cpu", "--threads", "1"]

SITECUSTOMIZE = '''
import builtins
import ctypes
import errno
import io
import os
import subprocess  # takes itself for Windows' where msvcrt imports: loaded before the stand-in exists
import sys
import types

import fcntl  # before it is hidden: the stand-in msvcrt locks with it


def locking(fd, mode, nbytes):
    """Windows' msvcrt.locking of nbytes at fd's position, as a POSIX record lock (gone when the process is)."""
    start = os.lseek(fd, 0, os.SEEK_CUR)
    if mode == msvcrt.LK_UNLCK:
        fcntl.lockf(fd, fcntl.LOCK_UN, nbytes, start)
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, nbytes, start)
    except OSError:
        raise OSError(errno.EACCES, "Permission denied") from None


msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_LOCK, msvcrt.LK_NBLCK, msvcrt.LK_RLCK, msvcrt.LK_NBRLCK = range(5)
msvcrt.locking = locking
sys.modules["msvcrt"] = msvcrt
sys.modules["fcntl"] = None  # import fcntl now raises ImportError
sys.modules["resource"] = None
for name in ("sched_getaffinity", "fchmod", "O_NOFOLLOW", "O_NONBLOCK"):
    delattr(os, name)


class CDLL(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        if name == "libc.so.6":
            raise OSError("libc.so.6: cannot open shared object file: No such file or directory")
        super().__init__(name, *args, **kwargs)


ctypes.CDLL = CDLL


def under_proc(path):
    return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith("/proc")


def without_proc(function, missing):
    def wrapper(path, *args, **kwargs):
        if under_proc(path):
            return missing(path)
        return function(path, *args, **kwargs)
    return wrapper


def no_such_file(path):
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)


builtins.open = io.open = without_proc(io.open, no_such_file)
os.path.exists = without_proc(os.path.exists, lambda path: False)
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(data.builtin_corpus()[:20_000] + "naïve café ☕ " * 200, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def other_system(tmp_path_factory):
    """The environment of a process that runs as if on another system."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    # Windows' own encoding is not UTF-8: an ASCII locale stands for it (a cp1252 console cannot show "☕" either).
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONIOENCODING": "cp1252"}


def run(env, *arguments, timeout=300):
    # The child writes cp1252 (PYTHONIOENCODING): read it as such.
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, encoding="cp1252",
                          errors="replace", timeout=timeout)


def test_the_simulation_takes_effect_and_each_difference_falls_back(other_system):
    probe = """if True:
        import json, os, sys
        from minillm import blas_threads, parallel, system
        import minillm.bench.tokenizer  # reads the peak memory of a load
        print(json.dumps({
            "locks": system.fcntl is None and system.msvcrt is sys.modules["msvcrt"],
            "cores": system.usable_cores() == os.cpu_count(),
            "malloc": system.keep_freed_memory(),
            "memory": system.resident_memory(),
            "idle": system.cores_idle_seconds(),
            "watch": blas_threads.WATCH is None,
            "flags": [system.NOFOLLOW, system.NONBLOCK],
            "cpu": system.cpu_name(),
        }))
    """
    result = run(other_system, "-c", probe)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["locks"] and seen["cores"] and seen["watch"]
    assert seen["malloc"] is False
    assert seen["memory"] == [None, None]  # no /proc, no resource: not known, rather than a guess
    assert seen["idle"] is None
    assert seen["flags"] == [0, 0]
    assert seen["cpu"]


def test_the_training_benchmarks_memory_probe_says_not_known_rather_than_failing(other_system):
    result = run(other_system, "-m", "minillm.bench.training", "--memory-probe", "baby", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"baseline": None, "peak": None}


def test_train_resume_sample_and_inspect_a_non_ascii_corpus(other_system, corpus, tmp_path):
    out_dir = tmp_path / "run"
    train = ["train.py", *TINY, "--data", str(corpus), "--out-dir", str(out_dir), "--eval-interval", "10"]
    first = run(other_system, *train, "--max-iters", "20")
    assert first.returncode == 0, first.stderr
    resumed = run(other_system, *train, "--max-iters", "30", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert max(entry["step"] for entry in log) == 30
    assert not (out_dir / checkpoint.LOCK_FILE).exists()
    sampled = run(other_system, "generate.py", "--ckpt", str(out_dir / "ckpt.npz"), "--max-new-tokens", "20",
                  "--device", "cpu", "--prompt", "naïve ☕")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.strip()
    inspected = run(other_system, "-m", "minillm.inspect", "--ckpt", str(out_dir / "ckpt.npz"), "--prompt", "café ☕",
                    "--out-dir", str(tmp_path / "inspect"), "--device", "cpu")
    assert inspected.returncode == 0, inspected.stderr
    assert inspected.stdout.strip()


# The same test on this system's own lock is tests/test_out_dir.py's.
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="kills the holder with SIGKILL")
def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_does_not_block(other_system, corpus, tmp_path):
    train = ["train.py", *TINY, "--data", str(corpus), "--out-dir", str(tmp_path)]
    # The child writes cp1252 (PYTHONIOENCODING), as run() reads it.
    lock = assert_a_second_run_is_refused_until_the_holder_is_killed(train, tmp_path, env=other_system,
                                                                     encoding="cp1252")
    assert not lock.exists()


def test_a_lock_file_that_is_a_link_is_refused_without_nofollow(other_system, corpus, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me", encoding="utf-8")
    (out_dir / checkpoint.LOCK_FILE).symlink_to(target)
    result = run(other_system, "train.py", *TINY, "--data", str(corpus), "--out-dir", str(out_dir),
                 "--max-iters", "2", timeout=120)
    assert result.returncode == 1
    assert "is a symbolic link" in result.stderr
    assert target.read_text(encoding="utf-8") == "keep me"


def test_resident_memory_is_read_in_the_units_of_each_system(monkeypatch, tmp_path):
    current, peak = system.resident_memory()
    if sys.platform.startswith("linux"):
        assert 0 < current <= peak
    monkeypatch.setattr(system, "PROC_STATUS", str(tmp_path / "missing"))
    usage = types.SimpleNamespace(ru_maxrss=5000)
    monkeypatch.setitem(sys.modules, "resource", types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: usage))
    for platform, expected in [("linux", (None, 5000 * 1024)), ("darwin", (None, 5000)), ("freebsd14", (None, None))]:
        monkeypatch.setattr(sys, "platform", platform)
        assert system.resident_memory() == expected, platform
    if not hasattr(system.ctypes, "WinDLL"):
        monkeypatch.setattr(sys, "platform", "win32")
        assert system.resident_memory() == (None, None)  # no Windows library to ask: not known, and no crash
