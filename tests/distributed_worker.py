"""What tests/test_distributed.py runs under mpiexec: python tests/distributed_worker.py MODE OUT [DEVICE].

    steps      each configuration of SETTINGS takes STEPS optimizer steps of a float64 model, each rank
               on its rows of fixed batches; rank 0 writes the summed gradients of the last step and the
               parameters to OUT (.npz), for the test to compare with one process on the whole batches
    identical  a float32 model with dropout trains on each rank's own random rows; OUT (.json) gets
               whether every rank ended with bit-identical parameters (an allreduce of a hash of them)
               and whether the ranks drew different rows
    dies       train.py on a tiny corpus, in which rank 1 alone fails (OUT says how: "raise" or "kill"
               at step 3, "setup" while reading the data): the job must end rather than wait for it
    evaluate   training.estimate_loss of a float64 model on EVAL_BATCHES fixed batches, each rank
               evaluating its share; rank 0 writes the loss to OUT (.json)
    interrupt  train.py on a tiny corpus, in which rank 1 alone gets a Ctrl-C (SIGINT) during its
               step 3; each rank writes the steps it took and its exit status to OUT.RANK.json
"""

import hashlib
import json
import os
import signal
import sys

import numpy

from minillm import backend, data, distributed, training
from minillm.layers.cross_entropy import IGNORE_INDEX
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW
from minillm.readback import NonfiniteWatch
from minillm.zero import ShardedAdamW, ZeroRanks

CONFIG = GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=2, n_embd=6)
ROWS, STEPS = 5, 3  # 5 rows: 3 and 2 on two ranks, an uneven split
SETTINGS = [(zero, accum) for zero in (0, 1) for accum in (1, 2)]
EVAL_BATCHES = 5  # 3 and 2 on two ranks


def fixed_batches(step, accum):
    """The micro-batches of a step: random tokens, some targets ignored (the ranks count unequal targets)."""
    rng = numpy.random.default_rng([step, accum])
    batches = []
    for _ in range(accum):
        idx = rng.integers(0, CONFIG.vocab_size, (ROWS, CONFIG.block_size))
        targets = rng.integers(0, CONFIG.vocab_size, (ROWS, CONFIG.block_size))
        targets[0, : rng.integers(1, CONFIG.block_size + 1)] = IGNORE_INDEX
        targets[-1, rng.integers(0, CONFIG.block_size)] = IGNORE_INDEX
        batches.append((idx, targets))
    return batches


def train_steps(world, zero, accum, device, steps=STEPS):
    """(model, optimizer, the gradients given to the last step's update): world's rows of fixed_batches."""
    model = GPT(CONFIG, seed=0, dtype="float64", device=device)
    cfg = training.TrainConfig(grad_accum=accum, grad_clip=0.5, lr=1e-2, warmup_iters=0, max_iters=steps)
    if zero:
        optimizer = ShardedAdamW(model, world, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        ranks = ZeroRanks(world, optimizer)
    else:
        optimizer = AdamW(model.trainable_params(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                          weight_decay=cfg.weight_decay)
        ranks = world
    recorded = {}
    step_of = optimizer.step

    def step_and_record(grads, lr):
        recorded.clear()
        recorded.update({name: g.copy() for name, g in grads.items()})
        step_of(grads, lr)

    optimizer.step = step_and_record
    mine = numpy.array_split(numpy.arange(ROWS), world.size)[world.rank]
    watch = NonfiniteWatch(device, model.dtype, "out")
    for step in range(steps):
        micro = iter(fixed_batches(step, accum))
        batch = lambda rng: tuple(a[mine] for a in next(micro))
        training.train_step(model, optimizer, batch, step, cfg, watch, ranks)
    return model, optimizer, recorded


def whole_gradient(world, optimizer, recorded):
    """name -> the summed gradient, from ZeRO's parts (each rank holds pieces of some parameters)."""
    xp = backend.get_array_module(optimizer.flat_params)
    flat = xp.zeros_like(optimizer.flat_params)
    for name, (a, b) in optimizer.pieces.items():
        flat[optimizer.lo + a:optimizer.lo + b] = recorded[name]
    world.allreduce(flat)  # the parts do not overlap: their sum is the whole
    return {name: flat[start:end].reshape(optimizer.shapes[name])
            for name, (start, end) in optimizer.layout.spans.items()}


def steps(world, out, device):
    arrays = {}
    for zero, accum in SETTINGS:
        model, optimizer, recorded = train_steps(world, zero, accum, device)
        grads = whole_gradient(world, optimizer, recorded) if zero else recorded
        for name in model.params:
            arrays[f"{zero}/{accum}/params/{name}"] = backend.to_host(model.params[name])
            arrays[f"{zero}/{accum}/grads/{name}"] = backend.to_host(grads[name])
    if world.is_main:
        numpy.savez(out, **arrays)


def digest(arrays):
    """The first 8 bytes of a SHA-256 of the arrays, as a float64 that an allreduce can compare."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(numpy.ascontiguousarray(backend.to_host(a)).tobytes())
    return float(int.from_bytes(h.digest()[:6], "little"))  # 48 bits: exact in a float64


def every_ranks(world, value):
    """[value of rank 0, value of rank 1, ...] on every rank: an allreduce of a vector holding each in its slot."""
    slots = numpy.zeros(world.size)
    slots[world.rank] = value
    return world.allreduce(slots).tolist()


def identical(world, out, device):
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.1)
    tokens = numpy.random.default_rng(0).integers(0, 11, 5000)
    results = {}
    for zero in (0, 1):
        model = GPT(config, seed=3, device=device)
        cfg = training.TrainConfig(batch_size=4, grad_accum=2, warmup_iters=1, max_iters=6, seed=5)
        options = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        optimizer = ShardedAdamW(model, world, **options) if zero else AdamW(model.trainable_params(), **options)
        ranks = ZeroRanks(world, optimizer) if zero else world
        drawn = []

        def batch(rng):
            idx, targets = data.get_batch(tokens, world.rows(cfg.batch_size), config.block_size, rng)
            drawn.append(idx)
            return idx, targets

        watch = NonfiniteWatch(device, model.dtype, "out")
        for step in range(cfg.max_iters):
            training.train_step(model, optimizer, batch, step, cfg, watch, ranks)
        params, rows = every_ranks(world, digest(model.params.values())), every_ranks(world, digest(drawn))
        results[str(zero)] = {"same_params": len(set(params)) == 1, "distinct_rows": len(set(rows)) == world.size}
    if world.is_main:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f)


def dies(world, how, args):
    """train.py whose rank 1 fails at its step 3, or in its setup."""
    step_of, corpus_of = training.train_step, training.load_corpus

    def failing_corpus(cfg):
        if world.rank == 1:
            raise data.DataError("rank 1 cannot read its data")
        return corpus_of(cfg)

    def failing_step(model, optimizer, batch, step, *rest):
        if world.rank == 1 and step == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("rank 1 broke down")
        return step_of(model, optimizer, batch, step, *rest)

    training.train_step, training.load_corpus = failing_step, failing_corpus if how == "setup" else corpus_of
    from minillm.train_cli import main

    sys.exit(main(args))


def eval_batches():
    """EVAL_BATCHES fixed (idx, targets) batches of ROWS rows, as estimate_loss takes them."""
    rng = numpy.random.default_rng(7)
    return [(rng.integers(0, CONFIG.vocab_size, (ROWS, CONFIG.block_size)),
             rng.integers(0, CONFIG.vocab_size, (ROWS, CONFIG.block_size))) for _ in range(EVAL_BATCHES)]


def evaluate(world, out, device):
    model = GPT(CONFIG, seed=0, dtype="float64", device=device)
    loss = training.estimate_loss(model, eval_batches(), world)
    if world.is_main:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"loss": loss}, f)


def interrupt(world, out, args):
    """train.py whose rank 1 alone gets a Ctrl-C during its step 3; OUT.RANK.json: its steps and status."""
    step_of, taken = training.train_step, []

    def step_and_record(model, optimizer, batch, step, *rest):
        taken.append(step)
        if world.rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step_of(model, optimizer, batch, step, *rest)

    training.train_step = step_and_record
    from minillm.train_cli import main

    status = main(args)
    with open(f"{out}.{world.rank}.json", "w", encoding="utf-8") as f:
        json.dump({"steps": taken, "status": status}, f)
    sys.exit(status)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    world = distributed.join()
    if mode == "dies":
        dies(world, out, sys.argv[3:])
    if mode == "interrupt":
        interrupt(world, out, sys.argv[3:])
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    if device == "cuda":
        world.take_gpu()
        world.connect_gpus()
    {"steps": steps, "identical": identical, "evaluate": evaluate}[mode](world, out, device)
