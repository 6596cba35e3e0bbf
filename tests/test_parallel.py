"""Splitting a batch across threads gives the whole batch's loss and gradients, ignored targets included."""

import platform
import threading

import numpy
import pytest

from minillm import parallel, system
from minillm.layers.cross_entropy import IGNORE_INDEX
from minillm.model import GPT, GPTConfig


def test_sharded_loss_and_gradients_equal_the_whole_batch():
    config = GPTConfig(vocab_size=9, block_size=6, n_layer=2, n_head=2, n_embd=8)
    model = GPT(config, seed=0, dtype="float64")
    rng = numpy.random.default_rng(0)
    idx = rng.integers(0, 9, (5, 6))
    targets = rng.integers(0, 9, (5, 6))
    targets[0, :4] = IGNORE_INDEX  # shards get unequal numbers of counted targets
    _, expected_loss = model(idx, targets)
    expected = model.backward()
    for shards in (1, 2, 3):
        sharded = parallel.ShardedGPT(model, shards)
        try:
            _, loss = sharded(idx, targets)
            grads = sharded.backward()
        finally:
            sharded.close()
        assert abs(float(loss) - float(expected_loss)) < 1e-12
        assert grads.keys() == expected.keys()
        for name in expected:
            numpy.testing.assert_allclose(grads[name], expected[name], rtol=1e-10, atol=1e-14)


def test_shards_share_the_parameters_and_evaluation_keeps_nothing_for_backward():
    config = GPTConfig(vocab_size=9, block_size=6, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, seed=0, dtype="float64")
    idx = numpy.random.default_rng(1).integers(0, 9, (4, 6))
    sharded = parallel.ShardedGPT(model, 2)
    try:
        sharded(idx, idx)
        assert model._cache is None  # the wrapped model's own cache is untouched
        assert all(replica.params is model.params for replica in sharded.replicas)
        sharded.backward()
        with pytest.raises(RuntimeError, match="needs a forward"):
            sharded.backward()
        sharded.eval()(idx, idx)
        assert all(replica._cache is None for replica in sharded.replicas)
        with pytest.raises(RuntimeError, match="needs a forward"):
            sharded.backward()
    finally:
        sharded.close()


def test_threads_give_the_same_result_as_one_thread_with_dropout():
    """Two shards on two threads or on one: the same masks (seeded per shard) and the same sum."""
    config = GPTConfig(vocab_size=9, block_size=6, n_layer=1, n_head=2, n_embd=8, dropout=0.3)
    model = GPT(config, seed=0)
    idx = numpy.random.default_rng(1).integers(0, 9, (4, 6))
    results = []
    for threads in (1, 2):
        sharded = parallel.ShardedGPT(model, 2)
        sharded.workers.close()
        sharded.workers = parallel.Workers(threads)
        sharded.reseed(5)
        _, loss = sharded(idx, idx)
        results.append((loss, sharded.backward()))
        sharded.close()
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert float(loss_a) == float(loss_b)
    for name in grads_a:
        assert numpy.array_equal(grads_a[name], grads_b[name])


def test_a_single_shard_runs_in_the_calling_thread_with_all_blas_threads():
    """A batch of one row is one shard: it must not run in a worker limited to one BLAS thread."""
    workers = parallel.Workers(2)
    try:
        assert workers.map(lambda _: threading.get_ident(), [0]) == [threading.get_ident()]
        assert threading.get_ident() not in workers.map(lambda _: threading.get_ident(), [0, 1])
    finally:
        workers.close()


def test_keep_freed_memory_takes_effect_on_glibc():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator settings are glibc's")
    assert system.keep_freed_memory() is True
