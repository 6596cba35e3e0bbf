"""The roofline's counts against hand counts from the shapes, and its ceilings measured on a tiny size.

A tiny GPT: vocabulary 11, context 6, 2 blocks of 2 heads, n_embd 8 (head size 4), batch 3,
so R = 18 rows of 8 channels; every count below is written out from those shapes.
"""

import math

import numpy
import pytest

from minillm.bench import roofline
from minillm.model import GPT, GPTConfig, parameter_shapes

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
B = 3


def test_matrix_products_per_layer_against_a_hand_count():
    flops = roofline.training_flops(TINY, B, query_block=4)
    # Causal blocks of 4 queries: queries 0-3 meet keys 0-3 (16 pairs), queries 4-5 keys 0-5 (12 pairs).
    forward = {
        "qkv": 2 * 18 * 8 * 24,                       # (18, 8) @ (8, 24)
        "attention scores": 2 * 3 * 2 * 28 * 4,       # 3 rows x 2 heads x 28 pairs, a dot product of 4 each
        "attention weights @ v": 2 * 3 * 2 * 28 * 4,
        "attention proj": 2 * 18 * 8 * 8,
        "mlp fc": 2 * 18 * 8 * 32,
        "mlp proj": 2 * 18 * 32 * 8,
    }
    for part, count in forward.items():
        assert flops.per_block[part] == (count, 2 * count), part
    assert flops.once["lm head"] == (2 * 18 * 8 * 11, 2 * 2 * 18 * 8 * 11)
    assert flops.products == 3 * (2 * sum(forward.values()) + 2 * 18 * 8 * 11)


def test_one_query_block_counts_the_full_square_as_the_reference_computes_it():
    full = roofline.training_flops(TINY, B, query_block=6)
    assert full.per_block["attention scores"][0] == 2 * 3 * 2 * 36 * 4  # all 6 x 6 pairs
    assert roofline.training_flops(TINY, B) == full  # the default blocks of 128 queries: one block here
    # The shares fast/attention.py's docstring gives: 75% of the square at T = 256, 56% at T = 1024.
    assert roofline.attention_pairs(256, 128) == 0.75 * 256**2
    assert roofline.attention_pairs(1024, 128) == 0.5625 * 1024**2


def test_the_full_square_is_nanogpts_count_less_its_share_for_biases_and_layernorms():
    # nanoGPT: (6 N + 12 L H Q T) per token, N every parameter but the position table. It counts
    # 6 per token for each bias and LayerNorm parameter too, which no matrix product multiplies.
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=12)
    shapes = {name: shape for name, shape in parameter_shapes(config).items() if name != "wpe.weight"}
    n = sum(math.prod(s) for s in shapes.values())
    vectors = sum(math.prod(s) for s in shapes.values() if len(s) == 1)
    tokens = 5 * 16
    nanogpt = (6 * n + 12 * 3 * 2 * 6 * 16) * tokens
    assert roofline.training_flops(config, 5, query_block=16).products == nanogpt - 6 * vectors * tokens


@pytest.mark.parametrize("bias", [True, False])
def test_the_rest_per_layer_against_a_hand_count(bias):
    flops = roofline.training_flops(GPTConfig(**(TINY.to_dict() | {"bias": bias})), B, query_block=4)
    rows_by_channels = 18 * 8
    layernorm = (8 + bias, 12 + bias)  # + b and db with a bias
    expected_block = {
        "layernorm": (2 * layernorm[0] * rows_by_channels, 2 * layernorm[1] * rows_by_channels),  # two a block
        "gelu": (8 * 18 * 32, 12 * 18 * 32),
        "softmax": (8 * 3 * 2 * 28, 6 * 3 * 2 * 28),       # per attention weight: 3 rows x 2 heads x 28 pairs
        "residual adds": (2 * rows_by_channels, 2 * rows_by_channels),
    }
    if bias:
        expected_block["biases"] = (18 * (24 + 8 + 32 + 8), 18 * (24 + 8 + 32 + 8))
    rest_block = {part: count for part, count in flops.per_block.items() if part not in roofline.PRODUCTS}
    assert rest_block == expected_block
    assert flops.once["layernorm"] == (layernorm[0] * rows_by_channels, layernorm[1] * rows_by_channels)
    assert flops.once["cross-entropy"] == (5 * 18 * 11, 1 * 18 * 11)
    assert flops.once["embedding"] == (rows_by_channels, 2 * rows_by_channels + 11 * 8)  # + the tied wte's sum
    # Matrices: wte 11x8, wpe 6x8, and per block 8x24, 8x8, 8x32, 32x8. Vectors: per block the two
    # LayerNorms (2 x 8, twice with biases) and the 24 + 8 + 32 + 8 biases; the final LayerNorm.
    matrices = 11 * 8 + 6 * 8 + 2 * (8 * 24 + 8 * 8 + 8 * 32 + 32 * 8)
    vectors = 2 * (2 * 8 * (1 + bias) + bias * (24 + 8 + 32 + 8)) + 8 * (1 + bias)
    assert flops.optimizer == 17 * matrices + 16 * vectors
    assert flops.rest == (sum(f + b for f, b in expected_block.values()) * 2 + sum(layernorm) * rows_by_channels
                          + 6 * 18 * 11 + 3 * rows_by_channels + 11 * 8 + flops.optimizer)
    assert flops.total == flops.products + flops.rest
    assert flops.forward == sum(f for f, _ in flops.parts().values())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_size, past", [(1, 0), (1, 5), (4, 3)])
def test_bytes_per_decoded_token_are_the_weights_once_and_the_kv_cache(dtype, batch_size, past):
    model = GPT(TINY, dtype=dtype)
    itemsize = numpy.dtype(dtype).itemsize
    # Every parameter once per step, less the rows of the position table other than the new position's.
    weights = model.num_params() - (TINY.block_size - 1) * TINY.n_embd
    # Per row: its wte row, and in each of 2 layers the keys and values of past + 1 positions of 8 channels.
    per_row = 8 + 2 * 2 * (past + 1) * 8
    expected = itemsize * (weights + batch_size * per_row) / batch_size
    assert roofline.decoding_bytes_per_token(TINY, dtype, batch_size, past) == expected


def test_a_batch_shares_the_weights_pass():
    one = roofline.decoding_bytes_per_token(TINY, "float32")
    eight = roofline.decoding_bytes_per_token(TINY, "float32", batch_size=8)
    weights = 4 * (GPT(TINY).num_params() - 5 * 8)
    assert one - eight == pytest.approx(weights * (1 - 1 / 8))


def test_measure_ceilings_gives_positive_finite_rates_on_a_tiny_size():
    for threads in (None, 1):
        ceilings = roofline.measure_ceilings(threads=threads, matmul_size=32, stream_mib=1, repeat=2)
        rates = (ceilings.matmul_gflops, ceilings.matvec_gbps, ceilings.elementwise_gbps)
        assert all(math.isfinite(rate) and rate > 0 for rate in rates), ceilings


def test_the_best_ceilings_take_each_rate_from_the_faster_measurement():
    before = roofline.Ceilings(matmul_gflops=200.0, matvec_gbps=30.0, elementwise_gbps=10.0)
    after = roofline.Ceilings(matmul_gflops=250.0, matvec_gbps=25.0, elementwise_gbps=12.0)
    assert roofline.best_ceilings(before, after) == roofline.Ceilings(250.0, 30.0, 12.0)


def test_product_stream_rate_is_positive_and_finite_for_one_row_and_several():
    for rows in (1, 8):
        rate = roofline.product_stream_gbps(rows, stream_mib=1, repeat=2)
        assert math.isfinite(rate) and rate > 0


def test_fraction_is_measured_over_ceiling():
    assert roofline.fraction(45.0, 50.0) == 0.9


@pytest.mark.parametrize("bias", [True, False])
def test_the_rests_memory_traffic_against_a_hand_count(bias):
    config = GPTConfig(**(TINY.to_dict() | {"bias": bias}))
    # Arrays read or written per element, forward + backward: LayerNorm 6, GELU 5, softmax 5, a residual
    # add 6, a bias 3, cross-entropy 3, the embedding 6; the optimizer 8 per parameter.
    per_block = (
        2 * 18 * 8 * 6        # two LayerNorms of 18 rows x 8 channels
        + 18 * 32 * 5         # GELU over 18 x 32
        + 3 * 2 * 28 * 5      # softmax: 3 rows x 2 heads x 28 (query, key) pairs in blocks of 4 queries
        + 2 * 18 * 8 * 6      # two residual adds
        + bias * 18 * (24 + 8 + 32 + 8) * 3
    )
    once = 18 * 8 * 6 + 18 * 11 * 3 + 18 * 8 * 6  # final LayerNorm, cross-entropy over 11, embedding
    params = sum(p.size for p in GPT(config).params.values())
    assert roofline.rest_bytes(config, B, query_block=4) == 4 * (2 * per_block + once + 8 * params)
    assert roofline.rest_bytes(config, B, itemsize=8, query_block=4) == 8 * (2 * per_block + once + 8 * params)
