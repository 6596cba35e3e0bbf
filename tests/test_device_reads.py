"""On a GPU, the training loop and the decoding loop read values back only where they choose to.

Reading a GPU array on the host (float(loss), bool(mask.any()), int(ids.max()))
waits for all the queued work. These tests run the code on a stand-in device:
NumPy arrays of a subclass whose values cannot be read on the host except through
the backend's explicit transfers (backend.to_host, to_float). Any hidden read
in a training step or a decoding step raises there, on any machine.
"""

import types

import numpy
import pytest

from minillm import backend, data
from minillm.model import GPT, GPTConfig
from minillm.readback import TrainingError
from minillm.sampling import generate
from minillm.training import TrainConfig, train


class HiddenRead(AssertionError):
    pass


class DeviceArray(numpy.ndarray):
    """An array on the stand-in device: reading its values on the host is refused."""

    def _refuse(self, *args, **kwargs):
        raise HiddenRead("a value of a device array was read on the host outside backend.to_host")

    __float__ = __int__ = __bool__ = __index__ = __complex__ = item = tolist = _refuse


def on_device(value):
    """value with every NumPy array in it (or made by it, for a generator) on the stand-in device."""
    if isinstance(value, numpy.ndarray):
        return value if isinstance(value, DeviceArray) else value.view(DeviceArray)
    if isinstance(value, numpy.random.Generator):
        return StandInModule(value)
    if isinstance(value, tuple):
        return tuple(on_device(v) for v in value)
    return value


class StandInModule:
    """NumPy (or one of its parts) as the stand-in device's array module: what it makes is a DeviceArray."""

    def __init__(self, wrapped, synchronizations=None):
        self._wrapped = wrapped
        if synchronizations is not None:
            self.cuda = types.SimpleNamespace(
                Device=lambda: types.SimpleNamespace(synchronize=lambda: synchronizations.append(1))
            )

    def __getattr__(self, name):
        if self._wrapped is numpy.random and name == "Philox4x3210":  # CuPy's name for it
            return numpy.random.Philox
        value = getattr(self._wrapped, name)
        if isinstance(value, types.ModuleType):
            return StandInModule(value)
        if callable(value) and not isinstance(value, type):
            return lambda *args, **kwargs: on_device(value(*args, **kwargs))
        return value


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """Device "cuda" is the stand-in; returns the list that each device synchronisation appends to."""
    synchronizations = []
    module = StandInModule(numpy, synchronizations)
    monkeypatch.setattr(backend, "_import_cupy", lambda: module)
    reads = []
    to_host = backend.to_host
    monkeypatch.setattr(backend, "to_host", lambda array: reads.append(1) or to_host(array))
    return types.SimpleNamespace(synchronizations=synchronizations, reads=reads)


def test_the_stand_in_refuses_hidden_reads(stand_in_gpu):
    x = backend.array_module("cuda").ones((2, 3), dtype=numpy.float32)
    loss = (x * 2.0).sum(axis=-1).mean(keepdims=True)[0, ...]
    assert isinstance(loss, DeviceArray)
    for hidden_read in (float, bool, int, lambda a: a.item()):
        with pytest.raises(HiddenRead):
            hidden_read(loss)
    assert backend.to_float(loss) == 6.0
    backend.synchronize("cuda")
    assert stand_in_gpu.synchronizations == [1] and stand_in_gpu.reads == [1]


def train_on_stand_in(tmp_path, max_iters, **options):
    tmp_path.mkdir(exist_ok=True)
    corpus = tmp_path / "text.txt"
    corpus.write_text(data.builtin_corpus()[:20_000])
    config = dict(
        data=str(corpus), out_dir=str(tmp_path / f"out{max_iters}"), n_layer=1, n_head=2, n_embd=16, block_size=8,
        batch_size=4, dropout=0.1, max_iters=max_iters, warmup_iters=2, lr_decay_iters=max_iters, eval_interval=1000,
        eval_iters=2, save_interval=1000, log_interval=12, sample_tokens=8, device="cuda",
    )
    return train(TrainConfig(**(config | options)))


def test_training_steps_read_nothing_between_log_lines(tmp_path, stand_in_gpu):
    train_on_stand_in(tmp_path, 12)
    reads, syncs = len(stand_in_gpu.reads), len(stand_in_gpu.synchronizations)
    train_on_stand_in(tmp_path, 24)
    # Twelve more steps add one log line: its loss, gradient norm and check, each
    # behind one synchronisation; the evaluations and saves are the same in both runs.
    assert len(stand_in_gpu.reads) - 2 * reads <= 3
    assert len(stand_in_gpu.synchronizations) - 2 * syncs <= 3


def test_a_nonfinite_step_is_caught_at_the_next_sync_point_and_named(tmp_path, stand_in_gpu):
    # Step 0's update, at a learning rate of 1e30, sends the weights so far that step 1's loss is NaN.
    # The CPU checks each step as it ends; the stand-in GPU finds it at the next log line, 10 steps later.
    for device in ("cpu", "cuda"):
        with pytest.raises(TrainingError, match=r"^step 1: the loss is nan") as caught:
            train_on_stand_in(tmp_path / device, 12, lr=1e30, grad_clip=0, device=device)
        assert "nothing from this step on was saved" in str(caught.value)


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0.8, top_k=3, top_p=0.9)])
def test_decoding_with_the_cache_reads_nothing_back(stand_in_gpu, options):
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8), device="cuda")
    tokens = generate(model, numpy.array([[1, 2]]), 9, **options)  # past block_size: the window slides
    assert isinstance(tokens, DeviceArray) and tokens.shape == (1, 11)
    assert stand_in_gpu.reads == [] and stand_in_gpu.synchronizations == []
