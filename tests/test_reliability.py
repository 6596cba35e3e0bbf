"""train.py and generate.py on bad input, run as a user runs them: as scripts, in a subprocess.

The contract:
- a usage error (a flag value of the wrong type or out of range, an impossible model, an unknown
  preset, a sampling option out of range) exits with status 2 and prints exactly one line on
  stderr that names the flag and, for a flag with a fixed set of values, those values;
- a runtime error (data that cannot be trained on, a missing, damaged or foreign checkpoint, a
  prompt the vocabulary cannot encode) exits with status 1 and prints one line; with --debug the
  traceback is shown instead;
- no file given as a checkpoint runs code when it is loaded;
- a save that fails leaves the previous checkpoint byte-identical and no temporary file behind.
"""

import errno
import importlib.util
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from minillm import backend, checkpoint, data

ROOT = Path(__file__).resolve().parent.parent

# A model and run small enough that a whole training run takes about a second.
TINY = dict(
    n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, max_iters=2, warmup_iters=1, lr_decay_iters=2,
    eval_interval=2, eval_iters=1, save_interval=2, log_interval=1, sample_tokens=4, threads=1, device="cpu",
)
UNKNOWN_CHARACTERS = "\u2603\u20ac"  # a snowman and a euro sign: not in the corpus below


def flags(**options):
    """Command-line flags for TINY with `options` replacing or adding to it."""
    return [str(item) for name, value in {**TINY, **options}.items() for item in (f"--{name.replace('_', '-')}", value)]


def run_script(script, *args):
    """Run train.py or generate.py from the repository root; stdout and stderr as text."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", env=env, timeout=120,
    )


def error_line(result, status):
    """The single line a failed run printed on stderr, after checking its exit status (one of `status`)."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert result.returncode in statuses, f"exit status {result.returncode}, stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{result.stderr}"
    return lines[0]


def assert_mentions(line, *fragments):
    missing = [fragment for fragment in fragments if fragment not in line]
    assert not missing, f"{missing} not in: {line}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few thousand characters of the built-in corpus, without UNKNOWN_CHARACTERS."""
    text = data.builtin_corpus()[:4000]
    assert not set(UNKNOWN_CHARACTERS) & set(text)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """The best checkpoint of a tiny training run (block size 8), made by the real script."""
    out = tmp_path_factory.mktemp("trained")
    result = run_script("train.py", "--data", corpus, "--out-dir", out, *flags())
    assert result.returncode == 0, result.stderr
    return out / "ckpt.npz"


# ---------------------------------------------------------------- usage errors: status 2, one line


def usage_case(*bad, mentions):
    """A parametrize case: the bad flags, and what the error line must mention."""
    return pytest.param(list(bad), mentions, id=" ".join(bad))


@pytest.mark.parametrize(
    "bad, fragments",
    [
        usage_case("--n-layer", "abc", mentions=["--n-layer", "abc"]),
        usage_case("--device", "tpu", mentions=["--device", "tpu", "cpu", "cuda", "auto"]),
        usage_case("--dtype", "float16", mentions=["--dtype", "float16", "float32", "float64"]),
        usage_case("--n-embd", "10", "--n-head", "3", mentions=["--n-embd", "--n-head"]),
        usage_case("--batch-size", "0", mentions=["--batch-size"]),
        usage_case("--n-layer", "0", mentions=["--n-layer"]),
        usage_case("--block-size", "-1", mentions=["--block-size"]),
        usage_case("--lr", "0", mentions=["--lr"]),
        usage_case("--dropout", "1.5", mentions=["--dropout"]),
        usage_case("--preset", "huge", mentions=["--preset", "huge", "baby", "small"]),
    ],
)
def test_train_usage_error_exits_2_with_one_line_naming_the_flag(tmp_path, corpus, bad, fragments):
    result = run_script("train.py", "--data", corpus, "--out-dir", tmp_path, *flags(), *bad)
    assert_mentions(error_line(result, 2), *fragments)


def test_block_size_beyond_the_pretrained_positions_is_a_usage_error(tmp_path, corpus, trained):
    result = run_script("train.py", "--data", corpus, "--out-dir", tmp_path, "--init-from", trained,
                        *flags(block_size=64))
    assert_mentions(error_line(result, 2), "--block-size", "64", "8")


@pytest.mark.parametrize(
    "bad, fragments",
    [
        usage_case("--temperature", "-1", mentions=["--temperature"]),
        usage_case("--top-k", "0", mentions=["--top-k"]),
        usage_case("--top-p", "0", mentions=["--top-p"]),
        usage_case("--num-samples", "0", mentions=["--num-samples"]),
    ],
)
def test_generate_usage_error_exits_2_with_one_line_naming_the_flag(trained, bad, fragments):
    result = run_script("generate.py", "--ckpt", trained, "--max-new-tokens", "4", "--device", "cpu", *bad)
    assert_mentions(error_line(result, 2), *fragments)


# ---------------------------------------------------------------- data errors: status 1, one line


def unusable_data(folder, kind):
    """(a --data path that cannot be trained on, words its error must contain, extra train flags)."""
    path = folder / "data.txt"
    if kind == "missing":
        return folder / "nowhere.txt", [str(folder / "nowhere.txt")], {}
    if kind == "folder without .txt":
        (folder / "notes.md").write_text("some text")
        return folder, [str(folder), ".txt"], {}
    if kind == "empty file":
        path.write_bytes(b"")
        return path, [str(path), "empty"], {}
    if kind == "not UTF-8":
        path.write_bytes(b"plain text, then \xff and more text " * 20)
        return path, [str(path), "UTF-8", "byte 17"], {}
    if kind == "short val split":
        path.write_text("abcdefghij" * 5)  # 50 tokens: 45 train, 5 val, and a window needs 9
        return path, ["val split"], {}
    path.write_text("abcdefghij" * 5)  # a window of 61 tokens fits in neither split; train is checked first
    return path, ["train split"], {"block_size": 60}


@pytest.mark.parametrize(
    "kind", ["missing", "folder without .txt", "empty file", "not UTF-8", "short val split", "short train split"]
)
def test_unusable_data_exits_1_with_one_line(tmp_path, kind):
    path, fragments, options = unusable_data(tmp_path, kind)
    result = run_script("train.py", "--data", path, "--out-dir", tmp_path / "out", *flags(**options))
    assert_mentions(error_line(result, 1), *fragments)


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "nowhere.txt"
    result = run_script("train.py", "--data", missing, "--out-dir", tmp_path / "out", *flags(), "--debug")
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "DataError" in result.stderr, result.stderr
    result = run_script("generate.py", "--ckpt", tmp_path / "nowhere.npz", "--debug")
    assert result.returncode == 1 and "CheckpointError" in result.stderr, result.stderr


# ---------------------------------------------------------------- bad checkpoints: status 1, one line, no code run


class TouchOnUnpickle:
    """Unpickling this creates `marker`: the proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def npz_with_a_pickled_array(marker):
    """A real .npz whose meta.json is an object array: its elements are pickles."""
    buffer = io.BytesIO()
    numpy.savez(buffer, **{"meta.json": numpy.array([TouchOnUnpickle(marker)], dtype=object)})
    return buffer.getvalue()


def bad_checkpoint(kind, good, marker):
    """The bytes of a damaged or foreign checkpoint file, or None for no file at all."""
    if kind == "missing":
        return None
    if kind.startswith("truncated"):
        return good[: {"truncated to 0 bytes": 0, "truncated to 100 bytes": 100,
                       "truncated to half": len(good) // 2, "truncated by 1 byte": len(good) - 1}[kind]]
    if kind == "random bytes":
        return numpy.random.default_rng(0).bytes(len(good))
    if kind == "text":
        return b"hello, I am not a checkpoint\n" * 10
    if kind == "pickle":
        return pickle.dumps({"params": TouchOnUnpickle(marker)})
    return npz_with_a_pickled_array(marker)


BAD_CHECKPOINTS = [
    "missing", "truncated to 0 bytes", "truncated to 100 bytes", "truncated to half", "truncated by 1 byte",
    "random bytes", "text", "pickle", "npz with a pickled array",
]


def test_the_pickle_payloads_do_run_code_when_unpickled(tmp_path):
    """The two pickle checkpoints below would create their marker if a loader unpickled them."""
    plain, in_npz = tmp_path / "plain", tmp_path / "in_npz"
    pickle.loads(pickle.dumps(TouchOnUnpickle(plain)))
    numpy.load(io.BytesIO(npz_with_a_pickled_array(in_npz)), allow_pickle=True)["meta.json"]
    assert plain.exists() and in_npz.exists()


@pytest.mark.parametrize("script", ["generate.py", "train.py"])
@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_a_one_line_error_and_runs_no_code(tmp_path, corpus, trained, kind, script):
    marker = tmp_path / "code-ran"
    path = tmp_path / "ckpt.npz"
    contents = bad_checkpoint(kind, trained.read_bytes(), marker)
    if contents is not None:
        path.write_bytes(contents)
    if script == "generate.py":
        result = run_script("generate.py", "--ckpt", path, "--max-new-tokens", "4", "--device", "cpu")
        status = 1
    else:
        result = run_script("train.py", "--data", corpus, "--out-dir", tmp_path / "out", "--init-from", path, *flags())
        status = (1, 2)
    assert_mentions(error_line(result, status), str(path))
    assert not marker.exists(), "loading the checkpoint ran code from it"


# ---------------------------------------------------------------- text the vocabulary lacks


def test_a_prompt_with_unknown_characters_is_a_one_line_error_naming_them(trained):
    result = run_script("generate.py", "--ckpt", trained, "--prompt", f"a{UNKNOWN_CHARACTERS}b",
                        "--max-new-tokens", "4", "--device", "cpu")
    assert_mentions(error_line(result, 1), *UNKNOWN_CHARACTERS)


def test_fine_tuning_on_text_with_unknown_characters_is_a_one_line_error_naming_them(tmp_path, corpus, trained):
    text = tmp_path / "new.txt"
    text.write_text(corpus.read_text(encoding="utf-8") + UNKNOWN_CHARACTERS, encoding="utf-8")
    result = run_script("train.py", "--data", text, "--out-dir", tmp_path / "out", "--init-from", trained, *flags())
    assert_mentions(error_line(result, 1), *UNKNOWN_CHARACTERS)


# ---------------------------------------------------------------- a save that fails


def fail_after_writing(error):
    """A stand-in for numpy.savez that writes part of a file, then raises `error`."""

    def savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04" + b"\0" * 1000)
        raise error

    return savez


@pytest.mark.parametrize(
    "error, raised",
    [
        (OSError(errno.ENOSPC, "No space left on device"), checkpoint.CheckpointError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
    ids=["disk full", "Ctrl-C"],
)
def test_a_failed_save_keeps_the_previous_checkpoint_and_no_temporary_file(
    tmp_path, trained, monkeypatch, error, raised
):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(trained.read_bytes())
    model, tokenizer, _, _ = checkpoint.load(path)
    monkeypatch.setattr(numpy, "savez", fail_after_writing(error))
    with pytest.raises(raised) as caught:
        checkpoint.save(path, model, tokenizer, step=99)
    if raised is checkpoint.CheckpointError:
        assert "No space left on device" in str(caught.value)
    assert path.read_bytes() == trained.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


KILLED_MID_SAVE = """
import os, signal, sys
import numpy
from minillm import checkpoint
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW

path, previous = sys.argv[1], sys.argv[2]
model, tokenizer, _, _ = checkpoint.load(previous)
big = GPT(GPTConfig(vocab_size=model.config.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128), seed=1)
write_array, written = numpy.lib.format.write_array, []

def write_then_die(*args, **kwargs):  # kill -9 once a few members of the new file are on their way to disk
    write_array(*args, **kwargs)
    written.append(1)
    if len(written) == 3:
        os.kill(os.getpid(), signal.SIGKILL)

numpy.lib.format.write_array = write_then_die
checkpoint.save(path, big, tokenizer, AdamW(big.params), step=99)
"""


def test_kill_9_while_a_large_checkpoint_is_written_leaves_the_previous_one_whole(tmp_path, trained):
    """Saves are atomic: a process killed with kill -9 in the middle of writing a large checkpoint over an
    older one leaves the older one whole and loadable, byte for byte."""
    path = tmp_path / "last.npz"
    path.write_bytes(trained.read_bytes())
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(path), str(trained)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert path.read_bytes() == trained.read_bytes()
    _, _, meta, _ = checkpoint.load(path)
    assert meta["step"] == checkpoint.read_meta(trained)["step"]


def test_a_prompt_longer_than_the_context_is_cropped_with_a_note(trained):
    result = run_script("generate.py", "--ckpt", trained, "--prompt", "the " * 10, "--max-new-tokens", "3",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("generate.py: note: the prompt has 40 tokens; "
                             "the model sees only the last 8 (its context)\n")


@pytest.mark.skipif(backend.cuda_available(), reason="here --device auto finds a GPU")
def test_device_auto_notes_the_cpu_only_where_cupy_was_installed(trained):
    result = run_script("generate.py", "--ckpt", trained, "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    cupy_installed = importlib.util.find_spec("cupy") is not None
    note = "generate.py: note: CuPy is installed but sees no CUDA GPU; sampling on the CPU\n"
    assert result.stderr == (note if cupy_installed else "")


def test_only_auto_with_cupy_installed_expected_a_gpu(monkeypatch):
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if installed else None)
        assert backend.auto_missed_a_gpu("auto", "cpu") is installed
        assert not backend.auto_missed_a_gpu("cpu", "cpu") and not backend.auto_missed_a_gpu("auto", "cuda")


def test_resuming_with_an_incompatible_model_is_a_usage_error(tmp_path, corpus, trained):
    (tmp_path / "last.npz").write_bytes((trained.parent / "last.npz").read_bytes())
    result = run_script("train.py", "--data", corpus, "--out-dir", tmp_path, "--resume", "--n-layer", "2")
    assert_mentions(error_line(result, 2), "differs from the options given", "resume with the options of that run")
