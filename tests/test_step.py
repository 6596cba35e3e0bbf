"""train_step runs what its lines say, in the same order on every path.

One step: draw this rank's micro-batches, weigh them, loss_and_gradients (each micro-batch's
forward then backward pass), sum_gradients over the ranks, clip, the non-finite watch, the
optimizer's step; with --log-layers the layer watch looks on either side of that step. These
tests follow train() on the default path of a multi-core machine (the batch split across two
threads), on --threads 1 and with --log-layers, recording the calls each step makes.
"""

import threading

import numpy
import pytest

from minillm import data, distributed, parallel, training
from minillm.health import LayerWatch
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW
from minillm.parallel import ShardedGPT
from minillm.readback import NonfiniteWatch
from minillm.training import TrainConfig, train
from minillm.zero import ShardedAdamW, ZeroRanks

TINY = dict(
    n_layer=1, n_head=2, n_embd=8, block_size=8, batch_size=4, grad_accum=2, dropout=0.1, max_iters=2,
    warmup_iters=1, lr_decay_iters=2, eval_interval=2, eval_iters=1, save_interval=2, log_interval=1,
    sample_tokens=2, device="cpu",
)
STAGES = ["draw", "draw", "micro_batch_weights", "loss_and_gradients", "sum_gradients", "clip_grad_norm", "step_done",
          "optimizer.step"]
WATCHED_STAGES = STAGES[:-1] + ["before_update", "optimizer.step", "after_update"]
PASSES = {"GPT.forward": (GPT, "forward"), "GPT.backward": (GPT, "backward"),
          "ShardedGPT.__call__": (ShardedGPT, "__call__"), "ShardedGPT.backward": (ShardedGPT, "backward"),
          "ShardedGPT.forward_backward": (ShardedGPT, "forward_backward")}


class StepRecorder:
    """Within each train_step: the stages it calls (on its own thread), and the model's passes (on any thread)."""

    def __init__(self, monkeypatch):
        self.stages, self.passes = [], []  # one list per step; passes hold (thread, name)
        self.in_step = False
        main = threading.main_thread()
        step_of = training.train_step

        def recorded_step(*args, **kwargs):
            self.stages.append([])
            self.passes.append([])
            self.in_step = True
            try:
                return step_of(*args, **kwargs)
            finally:
                self.in_step = False

        def recorded(name, fn, any_thread=False):
            def call(*args, **kwargs):
                if self.in_step and any_thread:
                    self.passes[-1].append((threading.get_ident(), name))
                elif self.in_step and threading.current_thread() is main:
                    self.stages[-1].append(name)
                return fn(*args, **kwargs)
            return call

        monkeypatch.setattr(training, "train_step", recorded_step)
        monkeypatch.setattr(data, "get_batch", recorded("draw", data.get_batch))
        for owner, attribute, name in (
            (distributed.World, "micro_batch_weights", "micro_batch_weights"),
            (training, "loss_and_gradients", "loss_and_gradients"),
            (distributed.World, "sum_gradients", "sum_gradients"),
            (ZeroRanks, "sum_gradients", "sum_gradients"),
            (training, "clip_grad_norm", "clip_grad_norm"),
            (NonfiniteWatch, "step_done", "step_done"),
            (AdamW, "step", "optimizer.step"),
            (ShardedAdamW, "step", "optimizer.step"),
            (LayerWatch, "before_update", "before_update"),
            (LayerWatch, "after_update", "after_update"),
        ):
            monkeypatch.setattr(owner, attribute, recorded(name, getattr(owner, attribute)))
        for name, (owner, attribute) in PASSES.items():
            monkeypatch.setattr(owner, attribute, recorded(name, getattr(owner, attribute), any_thread=True))


def recorded_run(tmp_path, corpus, monkeypatch, name, **options):
    with monkeypatch.context() as patched:
        recorder = StepRecorder(patched)
        train(TrainConfig(data=str(corpus), out_dir=str(tmp_path / name), **TINY, **options))
    assert len(recorder.stages) == TINY["max_iters"]
    return recorder


def test_threads_one_thread_and_log_layers_take_the_same_stages_in_the_same_order(tmp_path, corpus, monkeypatch):
    threads = recorded_run(tmp_path, corpus, monkeypatch, "threads", threads=2)
    alone = recorded_run(tmp_path, corpus, monkeypatch, "alone", threads=1)
    watched = recorded_run(tmp_path, corpus, monkeypatch, "watched", threads=2, log_layers=True)
    assert threads.stages == alone.stages == [STAGES] * TINY["max_iters"]
    assert watched.stages == [WATCHED_STAGES] * TINY["max_iters"]


def test_on_threads_each_shard_runs_its_forward_then_its_backward_inside_forward_backward(tmp_path, corpus,
                                                                                         monkeypatch):
    """No backward pass hides in a call named like a forward one: the model is asked for both at once."""
    recorder = recorded_run(tmp_path, corpus, monkeypatch, "threads", threads=2)
    main = threading.main_thread().ident
    for passes in recorder.passes:
        on_main = [name for thread, name in passes if thread == main]
        assert on_main == ["ShardedGPT.forward_backward"] * TINY["grad_accum"]
        on_shards = [name for thread, name in passes if thread != main]
        assert on_shards.count("GPT.forward") == on_shards.count("GPT.backward") == 2 * TINY["grad_accum"]
        for thread in {thread for thread, _ in passes} - {main}:
            names = [name for t, name in passes if t == thread]
            assert names == ["GPT.forward", "GPT.backward"] * (len(names) // 2)


def test_on_one_thread_each_micro_batch_runs_the_models_forward_then_its_backward(tmp_path, corpus, monkeypatch):
    recorder = recorded_run(tmp_path, corpus, monkeypatch, "alone", threads=1)
    main = threading.main_thread().ident
    for passes in recorder.passes:
        assert passes == [(main, "GPT.forward"), (main, "GPT.backward")] * TINY["grad_accum"]


def test_forward_backward_equals_the_pair_model_then_backward_bit_for_bit():
    """The fused call training uses and the GPT's own pair, on one and on several shards, with dropout."""
    config = GPTConfig(vocab_size=9, block_size=6, n_layer=1, n_head=2, n_embd=8, dropout=0.2)
    rng = numpy.random.default_rng(0)
    idx, targets = rng.integers(0, 9, (5, 6)), rng.integers(0, 9, (5, 6))
    for threads in (1, 2, 3):
        model = GPT(config, seed=0)
        sharded = ShardedGPT(model, threads) if threads > 1 else model
        try:
            sharded.reseed(7)
            fused_loss, fused = parallel.forward_backward(sharded, idx, targets)
            sharded.reseed(7)
            _, loss = sharded(idx, targets)
            pair = sharded.backward()
        finally:
            if sharded is not model:
                sharded.close()
        assert float(fused_loss) == float(loss)
        assert fused.keys() == pair.keys()
        for name in pair:
            assert numpy.array_equal(fused[name], pair[name]), name


@pytest.mark.parametrize("accum", [1, 2])
def test_zero_ranks_take_the_same_stages_and_steps_as_the_world(tmp_path, monkeypatch, accum):
    """--zero 1's ranks object, on a process alone: its own sum_gradients, the same parameters as AdamW's."""
    config = GPTConfig(vocab_size=9, block_size=6, n_layer=1, n_head=2, n_embd=8)
    tokens = numpy.random.default_rng(1).integers(0, 9, 400)
    cfg = TrainConfig(batch_size=3, grad_accum=accum, grad_clip=0.05, warmup_iters=0, max_iters=3)
    params, stages = {}, {}
    for zero in (False, True):
        model = GPT(config, seed=2, dtype="float64")
        optimizer = ShardedAdamW(model, distributed.SINGLE_PROCESS) if zero else AdamW(model.trainable_params())
        ranks = ZeroRanks(distributed.SINGLE_PROCESS, optimizer) if zero else distributed.SINGLE_PROCESS
        watch = NonfiniteWatch("cpu", model.dtype, tmp_path)
        with monkeypatch.context() as patched:
            recorder = StepRecorder(patched)
            for step in range(cfg.max_iters):
                training.train_step(model, optimizer, lambda rng: data.get_batch(tokens, 3, 6, rng), step, cfg,
                                    watch, ranks)
        params[zero], stages[zero] = model.params, recorder.stages
    assert stages[True] == stages[False] == [STAGES[:1] * accum + STAGES[2:]] * cfg.max_iters
    for name, p in params[False].items():
        assert numpy.array_equal(params[True][name], p), name
