"""Damaged checkpoints and failed saves: the loader raises CheckpointError or loads the very same
numbers (never anything else, never code), and a save that fails leaves the previous file intact."""

import errno
import pickle

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import tiny_model
from minillm import checkpoint
from minillm.optim import AdamW
from minillm.tokenizers.char import CharTokenizer


def saved(path, seed=0):
    model = tiny_model(dtype="float32", seed=seed, vocab_size=5)
    optimizer = AdamW(model.params)
    optimizer.step({name: numpy.ones_like(p) for name, p in model.params.items()})
    checkpoint.save(path, model, CharTokenizer("abcde"), optimizer, step=3)
    return model


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.npz"
    model = saved(path)
    return path.read_bytes(), model


@st.composite
def mutations(draw, size):
    """A damaged copy's recipe: truncation, overwritten bytes, inserted bytes or a deleted range."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete"]))
    # Half of the damage lands in the zip's central directory (its last few KB: names, sizes,
    # compression methods, flags), where one byte changes how the whole file is read.
    at = draw(st.one_of(st.integers(0, size - 1), st.integers(max(0, size - 4096), size - 1)))
    if kind == "truncate":
        return kind, at, b""
    if kind == "delete":
        return kind, at, draw(st.integers(1, 64))
    return kind, at, draw(st.binary(min_size=1, max_size=16))


def mutate(data, mutation):
    kind, at, payload = mutation
    if kind == "truncate":
        return data[:at]
    if kind == "delete":
        return data[:at] + data[at + payload :]
    if kind == "insert":
        return data[:at] + payload + data[at:]
    overwritten = data[:at] + payload + data[at + len(payload) :]
    return overwritten[: len(data)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_checkpoint_raises_checkpoint_error_or_loads_identically(original, tmp_path, data):
    good, model = original
    damaged = mutate(good, data.draw(mutations(len(good))))
    path = tmp_path / "damaged.npz"
    path.write_bytes(damaged)
    try:
        loaded, tokenizer, meta, optimizer_state = checkpoint.load(path)
    except checkpoint.CheckpointError:
        return
    assert loaded.params.keys() == model.params.keys()
    for name, p in model.params.items():
        assert numpy.array_equal(loaded.params[name], p), name
    assert tokenizer.chars == list("abcde") and meta["step"] == 3 and optimizer_state["t"] == 1


@pytest.mark.parametrize("field_offset, value", [(10, b"\x63\x00"), (8, b"\x41\x00"), (6, b"\xff\x00")])
def test_a_central_directory_asking_for_an_unknown_method_is_a_checkpoint_error(original, tmp_path, field_offset, value):
    """One overwritten field of the zip's directory: compression method 99, the encryption and
    "strong encryption" flags, a future zip version. zipfile raises NotImplementedError or
    RuntimeError for these, not BadZipFile."""
    good, _ = original
    at = good.index(b"PK\x01\x02") + field_offset  # the first central directory entry
    path = tmp_path / "damaged.npz"
    path.write_bytes(good[:at] + value + good[at + len(value) :])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable minillm checkpoint"):
        checkpoint.load(path)


def test_a_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"params": Payload()}))
    with pytest.raises(checkpoint.CheckpointError, match="not a readable minillm checkpoint"):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    saved(path, seed=0)
    before = path.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(numpy, "savez", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device; the previous ckpt.npz is unchanged"):
        saved(path, seed=1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]
