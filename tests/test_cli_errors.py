"""Bad input to the real scripts: exit status 1 and one line naming the problem, a traceback only with --debug."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
        "--max-iters", "2", "--eval-iters", "1", "--sample-tokens", "4", "--device", "cpu"]


def run(script, *flags):
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True, text=True)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def make_data(tmp_path, kind):
    """A --data argument that cannot be trained on, and the words its error must contain."""
    if kind == "missing":
        return tmp_path / "nowhere.txt", ["no such file or folder"]
    if kind == "no text files":
        (tmp_path / "notes.md").write_text("text")
        return tmp_path, ["has no .txt files"]
    path = tmp_path / "data.txt"
    if kind == "empty":
        path.write_text("")
        return path, ["is empty"]
    if kind == "binary":
        path.write_bytes(b"plain text, then \xff\xfe")
        return path, ["not UTF-8", "byte 17 is 0xff"]
    path.write_text("too short")  # 9 characters: no window of 9 tokens in the val split
    return path, ["split has", "--block-size"]


@pytest.mark.parametrize("kind", ["missing", "no text files", "empty", "binary", "short"])
def test_unusable_data_is_a_one_line_error(tmp_path, kind):
    path, fragments = make_data(tmp_path, kind)
    result = run("train.py", *TINY, "--data", str(path), "--out-dir", str(tmp_path / "out"))
    assert_one_line_error(result, str(path), *fragments)


def test_debug_shows_the_traceback(tmp_path):
    result = run("train.py", *TINY, "--data", str(tmp_path / "nowhere.txt"), "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "DataError" in result.stderr
    result = run("generate.py", "--ckpt", str(tmp_path / "nowhere.npz"), "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    result = run("train.py", *TINY, "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    return out / "ckpt.npz"


@pytest.mark.parametrize("damage", ["empty", "half", "all but the last byte", "text", "pickle"])
def test_a_damaged_or_foreign_checkpoint_is_a_one_line_error_and_runs_no_code(trained, tmp_path, damage):
    good = trained.read_bytes()
    marker = tmp_path / "ran"
    contents = {
        "empty": b"",
        "half": good[: len(good) // 2],
        "all but the last byte": good[:-1],
        "text": b"hello, I am not a checkpoint\n",
        "pickle": pickle.dumps(eval_touches(marker)),
    }[damage]
    path = tmp_path / "ckpt.npz"
    path.write_bytes(contents)
    for script, flags in (("generate.py", ["--ckpt", str(path)]),
                          ("train.py", [*TINY, "--init-from", str(path), "--out-dir", str(tmp_path / "out")])):
        assert_one_line_error(run(script, *flags), str(path))
    assert not marker.exists()


class eval_touches:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_prompt_longer_than_the_context_is_cropped_with_a_note(trained):
    result = run("generate.py", "--ckpt", str(trained), "--prompt", "the " * 10, "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "generate.py: note: the prompt has 40 tokens; the model sees only the last 8 (its context)\n"
