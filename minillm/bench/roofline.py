"""The machine's limits, and where a benchmark row stands against them.

No step can beat its work done at the machine's best rate:

    training step:    seconds >= matrix-product FLOPs / the float32 matrix-product rate
    decoding a token: seconds >= bytes read / the streaming rate of a matrix-vector product

`training_flops`, `rest_bytes` and `decoding_bytes_per_token` count the work from the shapes alone;
`measure_ceilings` measures the rates, in the same run as the rows it judges (another
process, load or clock gives other ceilings); `fraction` is a measured rate over its
ceiling: MFU is fraction(product FLOPs / step seconds, the product rate). `product_shapes`
lists a step's matrix products one by one, and `time_products` (`ProductsReplay`) runs them
alone at those shapes, split over threads as the step splits its batch: a bound closer than
the ceiling's, as small products run below the rate of a large one.
"""

import math
from dataclasses import dataclass

import numpy
from threadpoolctl import threadpool_limits

from minillm import parallel
from minillm.bench.common import median_seconds, seconds_of
from minillm.fast import attention
from minillm.model import parameter_shapes

PRODUCTS = ("qkv", "attention scores", "attention weights @ v", "attention proj", "mlp fc", "mlp proj", "lm head")
# Products the attention runs stacked over (batch rows, heads): one NumPy matmul call per causal block.
STACKED_PRODUCTS = ("attention scores", "attention weights @ v")

# The rest: FLOPs per element of the array a part works on, (forward, backward), counted in the fast
# layers' code: one for each add, subtract, multiply, divide, max, exp or tanh; two for an element of a
# row sum taken as a matrix-vector product (fast/rows.py). Work per row (1 / sqrt(var + eps), the log of
# a row's sum) is left out: C or V times smaller.
ELEMENTWISE = {
    # forward: mean (2), x - mu, square, variance (2), * rstd, * w; backward: dw (2), dout * w,
    # two row means (4), dxhat * xhat, two subtractions, xhat * projection, * rstd. With a bias
    # one more each: + b, and db.
    "layernorm": (8, 12),
    # forward: x * x, * A K, + K, * x, tanh, + 1, * x, * 0.5; backward: 12 steps of fast/gelu.py.
    "gelu": (8, 12),
    # forward: * scale, + mask, row max, - max, exp, row sum (2), / sum; backward: dP * P, row sum (2),
    # dP - sum, P * (...), * scale.
    "softmax": (8, 6),
    # forward: row max, - max, exp, sum, / sum; backward: * weight (the copy and the -1 at each target:
    # no arithmetic per element).
    "cross-entropy": (5, 1),
    # forward: + b; backward: db, a sum over rows.
    "biases": (1, 1),
    # x + a and x + m in each block; backward dx + dh for both.
    "residual adds": (2, 2),
    # forward: wte[idx] + wpe; backward: dwte by scatter-add, dwpe a sum over the batch.
    "embedding": (1, 2),
}
# Per parameter element: clipping g * g, its sum and g * scale (3); AdamW's 13 in-place steps of
# fast/adamw.py, and one more (p * decay) for the parameters that decay (optim.decays: ndim >= 2).
CLIPPING_AND_ADAMW, DECAY = 16, 1

# The rest's memory traffic were each layer one pass over its arrays, as code that runs a layer at a time
# (NumPy, PyTorch's eager mode) does at best: arrays of the part's size read or written, (forward, backward).
PASSES = {
    "layernorm": (3, 3),        # read x, write xhat (kept for backward) and out; read dout and xhat, write dx
    "gelu": (2, 3),             # read x, write out; read dout and x, write dx
    "softmax": (2, 3),          # read S, write P; read dP and P, write dS
    "cross-entropy": (1, 2),    # read the logits; read them again and write dlogits
    "biases": (2, 1),           # out += b: read and write out; db: read dout
    "residual adds": (3, 3),    # read x and a, write x + a; read the two gradients, write their sum
    "embedding": (3, 3),        # read wte[idx] and wpe, write x; read dx, read and write dwte's rows
}
# Per parameter element: clipping reads g; AdamW reads p, g, m and v and writes p, m and v.
OPTIMIZER_PASSES = 8


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step; each part name -> (forward, backward).

    per_block: one transformer block's parts (each block is the same);
    once: the parts outside the blocks (LM head, final LayerNorm, cross-entropy, embedding);
    optimizer: gradient clipping and AdamW over every parameter.
    """

    n_layer: int
    per_block: dict
    once: dict
    optimizer: int

    def parts(self):
        """part -> (forward, backward) over the whole step: a block's parts n_layer times, plus the rest."""
        totals = {name: (self.n_layer * f, self.n_layer * b) for name, (f, b) in self.per_block.items()}
        for name, (f, b) in self.once.items():
            before_f, before_b = totals.get(name, (0, 0))
            totals[name] = (before_f + f, before_b + b)
        return totals

    @property
    def products(self):
        """Matrix-product FLOPs, forward and backward: what MFU counts."""
        return sum(f + b for name, (f, b) in self.parts().items() if name in PRODUCTS)

    @property
    def rest(self):
        """Elementwise and reduction FLOPs (ELEMENTWISE) and the optimizer's."""
        return sum(f + b for name, (f, b) in self.parts().items() if name not in PRODUCTS) + self.optimizer

    @property
    def forward(self):
        """The forward pass alone, as evaluation runs it."""
        return sum(f for f, _ in self.parts().values())

    @property
    def total(self):
        return self.products + self.rest


def attention_pairs(T, query_block):
    """(query, key) pairs whose score the attention computes for T positions, per batch row and head.

    Blocks of query_block queries: block [a, b) meets keys 0..b-1 only (fast/attention.py), so
    pairs = sum over blocks of (b - a) b. One block (query_block >= T, as the reference computes)
    gives T^2: the masked-out upper triangle is computed too.
    """
    return sum((b - a) * b for a, b in attention.query_blocks(T, query_block))


def training_flops(config, batch_size, query_block=attention.QUERY_BLOCK):
    """StepFlops of one training step (forward, backward, clipping, AdamW) on (batch_size, block_size) tokens.

    A multiply-add is 2 FLOPs. R = B T rows, C = n_embd, H heads of hs = C / H, V = vocab_size,
    K = attention_pairs(T, query_block): the fast layers' causal blocks by default; query_block =
    block_size counts the reference layers' full T x T. Matrix products, forward:

        qkv                    2 R C 3C        per block
        attention scores       2 B H K hs      S = q k^T
        attention weights @ v  2 B H K hs      Y = P v
        attention proj         2 R C C
        mlp fc                 2 R C 4C
        mlp proj               2 R 4C C
        lm head                2 R C V         once

    Each backward is 2x its forward: dx = dy W^T and dW = x^T dy are each the forward's size, and
    attention's dP = dY v^T, dv = P^T dY, dq = dS k, dk = dS^T q are two of each of its products.
    The rest: ELEMENTWISE's counts per element of R C (LayerNorm, residual adds, embedding), R 4C
    (GELU), B H K (softmax), R V (cross-entropy), and of the linear outputs R 9C per block (biases,
    when the config has them); the tied wte's two gradients are added (V C); the optimizer
    CLIPPING_AND_ADAMW (+ DECAY) per parameter. Every parameter trains, dropout is off (the
    benchmarks' setting), and a step is one shard: the sums of sharded gradients are left out.
    """
    B, T, C, V, H = batch_size, config.block_size, config.n_embd, config.vocab_size, config.n_head
    R, K, bias = B * T, attention_pairs(T, query_block), int(config.bias)
    with_backward = lambda forward: (forward, 2 * forward)
    per_element = lambda part, n: (ELEMENTWISE[part][0] * n, ELEMENTWISE[part][1] * n)
    layernorm = lambda n: ((ELEMENTWISE["layernorm"][0] + bias) * n, (ELEMENTWISE["layernorm"][1] + bias) * n)
    per_block = {
        "qkv": with_backward(2 * R * C * 3 * C),
        "attention scores": with_backward(2 * B * K * C),  # H heads of hs = C / H
        "attention weights @ v": with_backward(2 * B * K * C),
        "attention proj": with_backward(2 * R * C * C),
        "mlp fc": with_backward(2 * R * C * 4 * C),
        "mlp proj": with_backward(2 * R * 4 * C * C),
        "layernorm": layernorm(2 * R * C),
        "gelu": per_element("gelu", R * 4 * C),
        "softmax": per_element("softmax", B * H * K),
        "residual adds": per_element("residual adds", R * C),
    }
    once = {
        "lm head": with_backward(2 * R * C * V),
        "layernorm": layernorm(R * C),
        "cross-entropy": per_element("cross-entropy", R * V),
        "embedding": (ELEMENTWISE["embedding"][0] * R * C, ELEMENTWISE["embedding"][1] * R * C + V * C),
    }
    if config.bias:
        per_block["biases"] = per_element("biases", R * (3 * C + C + 4 * C + C))
    shapes = parameter_shapes(config)
    optimizer = sum(math.prod(s) * (CLIPPING_AND_ADAMW + DECAY * (len(s) >= 2)) for s in shapes.values())
    return StepFlops(config.n_layer, per_block, once, optimizer)


def rest_bytes(config, batch_size, itemsize=4, query_block=attention.QUERY_BLOCK):
    """Bytes the rest of a training step (all but its matrix products) moves at the least, each layer one pass.

    PASSES arrays per element of R C (LayerNorm: two a block and the final one; the two residual adds
    of a block; the embedding), R 4C (GELU), B H K (softmax, K = attention_pairs), R V (cross-entropy)
    and R 9C per block (the linear layers' biases, when the config has them), and OPTIMIZER_PASSES per
    parameter, with R = B T. Over the memory's streaming rate this is the least time the rest can take
    in code that runs each layer as its own pass; fused kernels could move less.
    """
    B, T, C, V, H = batch_size, config.block_size, config.n_embd, config.vocab_size, config.n_head
    R, K = B * T, attention_pairs(T, query_block)
    per_block = {"layernorm": 2 * R * C, "gelu": R * 4 * C, "softmax": B * H * K, "residual adds": 2 * R * C}
    if config.bias:
        per_block["biases"] = R * (3 * C + C + 4 * C + C)
    once = {"layernorm": R * C, "cross-entropy": R * V, "embedding": R * C}
    passes = lambda sizes: sum(n * sum(PASSES[part]) for part, n in sizes.items())
    params = sum(math.prod(s) for s in parameter_shapes(config).values())
    return itemsize * (config.n_layer * passes(per_block) + passes(once) + OPTIMIZER_PASSES * params)


def product_shapes(config, batch_size, query_block=attention.QUERY_BLOCK):
    """[(part, (m, k, n), count)]: every matrix product of one training step, an (m, k) @ (k, n) run count times.

    As the fast layers compute them, forward and backward, with R = B T rows, C = n_embd, H heads
    of hs = C / H, V = vocab_size. A linear layer n_in -> n_out (fast/linear.py):

        forward   x @ W             (R, n_in, n_out)
        dx        dout @ W^T        (R, n_out, n_in)
        dW        x^T @ dout        (n_in, R, n_out)

    for qkv (C -> 3C), attention proj (C -> C), mlp fc (C -> 4C) and mlp proj (4C -> C), n_layer
    times each, and the LM head (C -> V, once: x @ wte^T, the tied wte; model.py). The attention
    (fast/attention.py), for each causal block [a, b) of q = b - a queries against the keys 0..b-1,
    B H times (a matmul stacked over the batch rows and heads) in each of n_layer blocks:

        attention scores         S = q_ab @ k_b^T     (q, hs, b)
                                 dq = dS @ k_b        (q, b, hs)
                                 dk_b = dS^T @ q_ab   (b, q, hs)
        attention weights @ v    Y = P @ v_b          (q, b, hs)
                                 dP = dY @ v_b^T      (q, hs, b)
                                 dv_b = P^T @ dY      (b, q, hs)

    Their FLOPs, the sum of 2 m k n count, are training_flops(config, batch_size, query_block).products.
    """
    B, T, C, V, H, L = (batch_size, config.block_size, config.n_embd, config.vocab_size, config.n_head,
                        config.n_layer)
    R, hs = B * T, C // H
    linear = lambda part, n_in, n_out, count: [
        (part, (R, n_in, n_out), count), (part, (R, n_out, n_in), count), (part, (n_in, R, n_out), count)
    ]
    shapes = linear("qkv", C, 3 * C, L)
    for a, b in attention.query_blocks(T, query_block):
        q = b - a
        shapes += [("attention scores", (q, hs, b), L * B * H), ("attention scores", (q, b, hs), L * B * H),
                   ("attention scores", (b, q, hs), L * B * H)]
        shapes += [("attention weights @ v", (q, b, hs), L * B * H), ("attention weights @ v", (q, hs, b), L * B * H),
                   ("attention weights @ v", (b, q, hs), L * B * H)]
    shapes += linear("attention proj", C, C, L) + linear("mlp fc", C, 4 * C, L) + linear("mlp proj", 4 * C, C, L)
    return shapes + linear("lm head", C, V, 1)


def product_operands(config, batch_size, rng, query_block=attention.QUERY_BLOCK):
    """[(a, b, out, runs)]: product_shapes' products for batch_size rows, on random float32 operands.

    Run numpy.matmul(a, b, out=out) `runs` times for each; the stacked products (attention's) are one
    matmul over (rows, heads) per block, as the attention calls them.
    """
    stack = batch_size * config.n_head
    operands = []
    for part, (m, k, n), count in product_shapes(config, batch_size, query_block):
        lead = (batch_size, config.n_head) if part in STACKED_PRODUCTS else ()
        runs = count // stack if part in STACKED_PRODUCTS else count
        a = rng.standard_normal((*lead, m, k), dtype=numpy.float32)
        b = rng.standard_normal((*lead, k, n), dtype=numpy.float32)
        operands.append((a, b, numpy.empty((*lead, m, n), dtype=numpy.float32), runs))
    return operands


class ProductsReplay:
    """One training step's matrix products (product_shapes) alone, on random float32 operands; call it to run them.

    The batch is split by rows as parallel.ShardedGPT splits it (numpy.array_split into
    min(threads, batch_size) shards), and each shard's products, at the shapes of its own rows,
    run on a thread of parallel.Workers: one BLAS thread each, the shards at once; one shard
    (threads 1, or a batch of one row) runs here with all BLAS threads.

    Contiguous operands, a fresh set per product, the same set for each of its count runs, the
    results written into buffers of their own: no allocation, no copy, and operands warm in the
    cache where the step's differ per layer, so the replay is a bound from below on the step's products.
    """

    def __init__(self, config, batch_size, threads, query_block=attention.QUERY_BLOCK, seed=0):
        rng = numpy.random.default_rng(seed)
        rows = numpy.array_split(numpy.arange(batch_size), min(threads, batch_size))
        self.shards = [product_operands(config, len(r), rng, query_block) for r in rows]
        self.workers = parallel.Workers(threads)

    @staticmethod
    def _run(operands):
        for a, b, out, runs in operands:
            for _ in range(runs):
                numpy.matmul(a, b, out=out)

    def __call__(self):
        self.workers.map(self._run, self.shards)

    def close(self):
        self.workers.close()


def time_products(config, batch_size, threads, repeat=5, query_block=attention.QUERY_BLOCK):
    """Seconds of one training step's matrix products alone (ProductsReplay): the median of `repeat` runs after one.

    The median, not the best, as the step it is set against (bench/training.py) is the median of
    its steps: the step's seconds less these are then its other work, not the product's luck.
    """
    replay = ProductsReplay(config, batch_size, threads, query_block)
    try:
        return median_seconds(replay, repeat)
    finally:
        replay.close()


def decoding_bytes_per_token(config, dtype, batch_size=1, past=0):
    """Bytes a decoding step (model.decode of one new position per row) reads, per token it yields.

    With N parameters of `itemsize` bytes, C = n_embd, L = n_layer, and `past` positions cached:

        weights    N - (block_size - 1) C    every parameter once for the whole batch: the LM head
                                             reads all of wte; of wpe, only the new position's row
        per row    C + 2 L (past + 1) C      its wte row (the embedding), and in each layer the keys
                                             and values of past + 1 positions (the new one included)
        per token  itemsize (weights + batch_size * per row) / batch_size

    A batch shares the weights' pass, so batch_size rows divide it. Left out: the activations
    (a few vectors of C or 4C per row) and each layer's 2 C written into the cache, which stay
    in the processor's caches. A model without LoRA adapters (their merge reads more).
    """
    itemsize = numpy.dtype(dtype).itemsize
    C, L = config.n_embd, config.n_layer
    params = sum(math.prod(shape) for shape in parameter_shapes(config).values())
    weights = params - (config.block_size - 1) * C
    per_row = C + 2 * L * (past + 1) * C
    return itemsize * (weights + batch_size * per_row) / batch_size


def fraction(measured, ceiling):
    """measured / ceiling: how much of the machine's limit a rate reaches (0.9: 90% of the bound)."""
    return measured / ceiling


@dataclass(frozen=True)
class Ceilings:
    """The machine's float32 rates: matrix products in GFLOP/s, streaming in GB/s (1e9 bytes)."""

    matmul_gflops: float
    matvec_gbps: float
    elementwise_gbps: float


def best_ceilings(*measurements):
    """The fastest of several Ceilings, rate by rate: other load only ever slows a measurement."""
    return Ceilings(*(max(getattr(m, field) for m in measurements)
                      for field in ("matmul_gflops", "matvec_gbps", "elementwise_gbps")))


def measure_ceilings(xp=numpy, threads=None, matmul_size=2048, stream_mib=512, repeat=5):
    """The best of `repeat` runs of each, after one untimed run (other load only ever slows a run):

        matmul       a @ a, a float32 n x n (n = matmul_size)        2 n^3 FLOPs
        matvec       x @ w, x one row, w float32 of stream_mib MiB   w.nbytes read: a decoding step's
                     stored input-by-output, as the model's weights  products at batch 1
        elementwise  b = a * 1.5, a and b of stream_mib / 2 each     a.nbytes read + b.nbytes written

    512 MiB, about GPT-2 small's float32 weights, is larger than a processor's last-level cache
    (260 MiB on the machine BENCHMARKS.md was measured on): the streaming rates are memory's.
    `threads` limits the BLAS threads (None: all of them); NumPy's elementwise pass runs on one.
    `xp` cupy measures a GPU, each clock read after synchronising it.
    """
    sync = None if xp is numpy else xp.cuda.Device().synchronize
    n, n_out = matmul_size, 4096
    a = xp.full((n, n), 0.5, dtype=xp.float32)
    w = xp.full((max(1, stream_mib * 2**20 // (4 * n_out)), n_out), 0.5, dtype=xp.float32)
    x = xp.full((1, w.shape[0]), 0.5, dtype=xp.float32)
    source = xp.full(stream_mib * 2**20 // 8, 0.5, dtype=xp.float32)
    target = xp.empty_like(source)
    with threadpool_limits(threads, user_api="blas"):
        matmul = best_seconds(lambda: a @ a, repeat, sync)
        matvec = best_seconds(lambda: x @ w, repeat, sync)
    elementwise = best_seconds(lambda: xp.multiply(source, 1.5, out=target), repeat, sync)
    return Ceilings(2 * n**3 / matmul / 1e9, w.nbytes / matvec / 1e9, 2 * source.nbytes / elementwise / 1e9)


class StreamingRate:
    """GB/s at which a product x @ w with `rows` rows of x streams w (float32, stream_mib MiB, stored as the
    model's weights), each call measured anew (the best of `repeat`): the bound of a decoding step at batch
    `rows`, where each weight is read once for all the rows. BLAS runs one row as a matrix-vector product and
    several as a matrix product, whose packing of w makes it stream w more slowly (BENCHMARKS.md,
    "Sampling"). Allocated once, so that a benchmark can measure it again beside each of its runs."""

    def __init__(self, rows=1, xp=numpy, threads=None, stream_mib=512):
        self.sync = None if xp is numpy else xp.cuda.Device().synchronize
        n_out = 4096
        self.w = xp.full((max(1, stream_mib * 2**20 // (4 * n_out)), n_out), 0.5, dtype=xp.float32)
        self.x = xp.full((rows, self.w.shape[0]), 0.5, dtype=xp.float32)
        self.threads = threads

    def __call__(self, repeat=3):
        with threadpool_limits(self.threads, user_api="blas"):
            return self.w.nbytes / best_seconds(lambda: self.x @ self.w, repeat, self.sync) / 1e9


def product_stream_gbps(rows, xp=numpy, threads=None, stream_mib=512, repeat=5):
    """StreamingRate(rows, ...) measured once."""
    return StreamingRate(rows, xp, threads, stream_mib)(repeat)


def best_seconds(fn, repeat, sync=None):
    """The shortest of `repeat` timed fn() calls after an untimed one; `sync` as in common.seconds_of."""
    fn()
    return min(seconds_of(fn, sync) for _ in range(repeat))
