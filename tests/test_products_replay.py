"""A training step's matrix products listed one by one, against the roofline's count, and replayed alone.

The tiny GPT of test_roofline.py: vocabulary 11, context 6, 2 blocks of 2 heads, n_embd 8 (head size 4).
"""

import math

import numpy
import pytest

from minillm import parallel
from minillm.bench import roofline
from minillm.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)


def flops_by_part(shapes):
    totals = {}
    for part, (m, k, n), count in shapes:
        totals[part] = totals.get(part, 0) + 2 * m * k * n * count
    return totals


@pytest.mark.parametrize("config", [
    TINY,
    GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, bias=False),
    GPTConfig(vocab_size=50, block_size=13, n_layer=3, n_head=3, n_embd=12),
])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("query_block", [4, 5, 128])  # 6 and 13 positions: a last block shorter than the others
def test_the_products_flops_are_the_roofline_count_part_by_part(config, batch_size, query_block):
    shapes = roofline.product_shapes(config, batch_size, query_block)
    flops = roofline.training_flops(config, batch_size, query_block)
    assert flops_by_part(shapes) == {part: f + b for part, (f, b) in flops.parts().items() if part in roofline.PRODUCTS}
    assert sum(2 * math.prod(shape) * count for _, shape, count in shapes) == flops.products


def test_the_attention_products_of_each_causal_block_against_a_hand_count():
    shapes = roofline.product_shapes(TINY, 3, query_block=4)
    attention = [(part, shape, count) for part, shape, count in shapes if part in roofline.STACKED_PRODUCTS]
    # Queries 0-3 against keys 0-3, then queries 4-5 against keys 0-5; 3 rows x 2 heads x 2 blocks each.
    assert attention == [
        ("attention scores", (4, 4, 4), 12), ("attention scores", (4, 4, 4), 12), ("attention scores", (4, 4, 4), 12),
        ("attention weights @ v", (4, 4, 4), 12), ("attention weights @ v", (4, 4, 4), 12),
        ("attention weights @ v", (4, 4, 4), 12),
        ("attention scores", (2, 4, 6), 12), ("attention scores", (2, 6, 4), 12), ("attention scores", (6, 2, 4), 12),
        ("attention weights @ v", (2, 6, 4), 12), ("attention weights @ v", (2, 4, 6), 12),
        ("attention weights @ v", (6, 2, 4), 12),
    ]
    # The tied LM head: x @ wte^T, dx = dlogits @ wte, dwte^T = x^T @ dlogits, on 18 rows.
    assert shapes[-3:] == [("lm head", (18, 8, 11), 1), ("lm head", (18, 11, 8), 1), ("lm head", (8, 18, 11), 1)]


@pytest.mark.parametrize("batch_size, threads", [(5, 2), (7, 3), (1, 2)])
def test_the_shards_products_add_up_to_the_whole_batchs(batch_size, threads):
    rows = numpy.array_split(numpy.arange(batch_size), min(threads, batch_size))
    shard_flops = sum(sum(2 * math.prod(shape) * count for _, shape, count in roofline.product_shapes(TINY, len(r)))
                      for r in rows)
    assert shard_flops == roofline.training_flops(TINY, batch_size).products


@pytest.mark.parametrize("batch_size, threads, shard_rows", [(5, 2, [3, 2]), (1, 2, [1]), (3, 1, [3])])
def test_the_replay_splits_the_batch_as_the_sharded_model_does(batch_size, threads, shard_rows):
    model = parallel.ShardedGPT(GPT(TINY), threads) if threads > 1 else GPT(TINY)
    replicas = model.replicas if threads > 1 else [model]
    rows_seen = {}
    for s, replica in enumerate(replicas):  # each replica notes the rows its forward pass is given
        replica.forward = lambda idx, targets, s=s, forward=replica.forward: (
            rows_seen.setdefault(s, len(idx)), forward(idx, targets))[1]
    idx = numpy.zeros((batch_size, TINY.block_size), dtype=numpy.int64)
    model.eval()
    model(idx, idx)
    if threads > 1:
        model.close()
    assert [rows_seen[s] for s in sorted(rows_seen)] == shard_rows
    replay = roofline.ProductsReplay(TINY, batch_size, threads)
    try:
        # Each shard's first product is the qkv forward on its own rows: (rows T, C) @ (C, 3C).
        assert [shard[0][0].shape for shard in replay.shards] == [(rows * 6, 8) for rows in shard_rows]
        # The attention's products stacked over (rows, heads), one matmul per block and layer.
        stacked = [(a.shape[:2], runs) for a, _, _, runs in replay.shards[0] if a.ndim == 4]
        assert stacked and all(lead == (shard_rows[0], 2) and runs == 2 for lead, runs in stacked)
    finally:
        replay.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_time_products_is_a_positive_finite_number_of_seconds(threads):
    seconds = roofline.time_products(TINY, 3, threads, repeat=2)
    assert math.isfinite(seconds) and seconds > 0
