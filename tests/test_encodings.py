"""The commands on a console or pipe that is not UTF-8, with text that is not ASCII.

Run under an ASCII locale (LC_ALL=C, UTF-8 mode off), what a redirected cp1252 stdout on Windows
amounts to for text outside Latin-1: the corpus is still read as UTF-8, the prompt is still taken
as typed, and a character that standard output cannot encode is printed as "?", never an error.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT = "naïve café ☕ "
PROMPT = "naïve ☕"
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--eval-interval", "10",
        "--sample-tokens", "20", "--threads", "1", "--device", "cpu"]


def run(args, cwd, stdout_encoding=None):
    """The command's (exit status, stdout as bytes, stderr as text) under an ASCII locale."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONIOENCODING"}
    env.update(PYTHONUTF8="0", LC_ALL="C")
    if stdout_encoding:
        env["PYTHONIOENCODING"] = stdout_encoding
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, env=env)
    return result.returncode, result.stdout, result.stderr.decode("utf-8", "backslashreplace")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with the corpus and out/, trained there under the ASCII locale: (folder, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("encodings")
    (folder / "corpus.txt").write_text(TEXT * 200, encoding="utf-8")
    status, out, err = run([str(ROOT / "train.py"), "--data", "corpus.txt", "--max-iters", "20", *TINY], folder)
    assert status == 0, err
    return folder, out, err


def sample_lines(stdout):
    """The indented lines that follow each "sample" heading of train.py's output."""
    lines = stdout.decode("ascii").splitlines()
    return [line for before, line in zip(lines, lines[1:]) if before.strip().startswith("sample") and line]


def test_training_on_a_non_ascii_corpus_prints_its_samples_with_question_marks(trained):
    folder, out, err = trained
    samples = sample_lines(out)
    assert len(samples) == 4, out  # steps 0, 10 and 20, and the final one
    assert all(set(line.strip()) <= set("?naivecf ") for line in samples), samples
    assert any("?" in line for line in samples)
    assert (folder / "out" / "ckpt.npz").exists() and (folder / "out" / "last.npz").exists()


def test_a_resumed_run_on_a_non_ascii_corpus_finishes(trained):
    folder, _, _ = trained
    status, out, err = run([str(ROOT / "train.py"), "--resume", "--max-iters", "30"], folder)
    assert status == 0, err
    assert b"step 30: train loss" in out and sample_lines(out), out


@pytest.mark.parametrize("encoding, shown", [
    ("cp1252", "naïve ?".encode("cp1252")),  # cp1252 has "ï" but not "☕"
    (None, b"na?ve ?"),  # the ASCII locale's own encoding
    ("utf-8", PROMPT.encode("utf-8")),  # a UTF-8 stdout gets the text's exact bytes
])
def test_generate_prints_a_non_ascii_prompt_and_its_sample(trained, encoding, shown):
    folder, _, _ = trained
    status, out, err = run([str(ROOT / "generate.py"), "--prompt", PROMPT, "--max-new-tokens", "10", "--device", "cpu"],
                           folder, encoding)
    assert status == 0, err
    assert out.startswith(shown), out
    assert "Traceback" not in err


def test_generate_still_rejects_a_prompt_that_is_not_utf8(trained):
    folder, _, _ = trained
    status, _, err = run([str(ROOT / "generate.py"), b"--prompt=caf\xe9", "--device", "cpu"], folder)
    assert status == 2 and "--prompt: not UTF-8 text (byte 3 is 0xe9)" in err, err


def test_inspect_shows_a_non_ascii_prompt(trained, tmp_path):
    folder, _, _ = trained
    status, out, err = run(["-m", "minillm.inspect", "--ckpt", str(folder / "out" / "ckpt.npz"), "--prompt", PROMPT,
                            "--out-dir", str(tmp_path)], folder, "cp1252")
    assert status == 0, err
    table = out.decode("cp1252")
    assert "'ï'" in table and "'?'" in table, table  # "☕" is not in cp1252
    assert (tmp_path / "inspect.json").exists()
