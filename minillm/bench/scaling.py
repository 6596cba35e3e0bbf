"""Training on several processes: 2 MPI ranks against 1 process on this machine, the cost of the
exchanges, and an alpha-beta model of how a step scales to many ranks over a network.

    python -m minillm.bench.scaling [--write] [--rounds K] [--steps S]

Each round runs, in turns, three fresh runs of S `small` training steps (train.py's
train_step on fixed tokens, the batch of 8 rows split across the workers):
    1 process, 1 thread, 2 BLAS threads       the matrix products on both cores
    1 process, 2 threads (train.py's default) each thread half the batch, 1 BLAS thread each
    2 ranks (mpiexec -n 2), 1 thread each     each rank half the batch, summed by one allreduce
then, on 2 ranks, timed collectives: the allreduce of a GPT-2-small gradient (124M float32),
its reduce-scatter + allgather (ZeRO-1), the allreduce of `small`'s gradient, and of a few
numbers (the latency). The figures are medians over rounds; the ratios are medians of
per-round ratios, so a machine shared with other work compares the runs fairly.
It needs the mpi extra (pip install -e ".[mpi]").
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from minillm.bench.common import format_table, write_section

TITLE = "Many processes: data parallelism on MPI"
GPT2_PARAMS = 124_439_808  # GPT-2 small, the tied wte counted once
NETWORK_BYTES_PER_S = 100e9 / 8  # 100 Gb/s
NETWORK_LATENCY_S = 10e-6  # per message, an assumption for such a network (MPI over RDMA is nearer 2 us, TCP 20+ us)


def worker(kind, steps):
    """Time `steps` training steps of `small` in this process (a rank of mpiexec for "ranks"); print JSON."""
    import numpy
    from threadpoolctl import threadpool_limits

    from minillm import distributed, parallel, system
    from minillm.bench.configs import CONFIGS, benchmark_tokens
    from minillm.model import GPT
    from minillm.optim import AdamW
    from minillm.readback import NonfiniteWatch
    from minillm.training import TrainConfig, train_step

    world = distributed.join()
    cores = world.cores(system.usable_cores())
    threadpool_limits(limits=cores, user_api="blas")
    system.keep_freed_memory()
    config, batch_size, _ = CONFIGS["small"]
    model = GPT(config, seed=0)
    optimizer = AdamW(model.params, lr=1e-4)
    stepper = parallel.ShardedGPT(model, cores) if kind == "threads" else model
    idx = benchmark_tokens(config, batch_size)
    mine = idx[numpy.array_split(numpy.arange(batch_size), world.size)[world.rank]]
    cfg = TrainConfig(lr=1e-4, min_lr=1e-4, warmup_iters=0, grad_clip=1.0)
    watch = NonfiniteWatch("cpu", model.dtype, out_dir=None)
    exchange, optimizer_seconds = [0.0], [0.0]

    def timed(fn, into):
        def run(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            into[0] += time.perf_counter() - start
            return result
        return run

    world.sum_gradients = timed(world.sum_gradients, exchange)
    world.micro_batch_weights = timed(world.micro_batch_weights, exchange)
    world.any = timed(world.any, exchange)
    optimizer.step = timed(optimizer.step, optimizer_seconds)
    step_seconds, exchange_seconds, adamw_seconds = [], [], []
    for step in range(steps + 1):  # the first step warms up, untimed
        exchange[0] = optimizer_seconds[0] = 0.0
        start = time.perf_counter()
        world.any(False)  # as train.py's loop asks before each step whether any rank was told to stop
        train_step(stepper, optimizer, lambda rng: (mine, mine), step, cfg, watch, world)
        if step:
            step_seconds.append(time.perf_counter() - start)
            exchange_seconds.append(exchange[0])
            adamw_seconds.append(optimizer_seconds[0])
    if kind == "threads":
        stepper.close()
    if world.is_main:
        print(json.dumps({"step": step_seconds, "exchange": exchange_seconds, "adamw": adamw_seconds,
                          "params": model.num_params(), "tokens": int(idx.size)}))


def collectives(repeat):
    """On mpiexec's ranks: median seconds of the allreduce and reduce-scatter + allgather of GPT-2 small's
    gradient, of `small`'s, and of 3 numbers; print JSON from rank 0."""
    import numpy

    from minillm import distributed
    from minillm.bench.configs import CONFIGS

    world = distributed.join()
    small = sum(math.prod(s) for s in _shapes(CONFIGS["small"][0]))
    results = {}
    for name, size in (("gpt2", GPT2_PARAMS), ("small", small), ("tiny", 3)):
        size -= size % world.size
        buffer = numpy.ones(size, dtype=numpy.float32)
        part = numpy.empty(size // world.size, dtype=numpy.float32)
        for what, exchange in (("allreduce", lambda: world.allreduce(buffer)),
                               ("zero", lambda: (world.reduce_scatter(buffer, part), world.allgather(buffer)))):
            if name == "tiny" and what == "zero":
                continue
            seconds = []
            for _ in range(repeat if name == "gpt2" else 20 * repeat):
                world.comm.Barrier()
                start = time.perf_counter()
                exchange()
                seconds.append(time.perf_counter() - start)
            results[f"{name} {what}"] = statistics.median(seconds)
        results[f"{name} bytes"] = size * 4
        buffer = part = None  # let the next size's buffers take this one's memory
    if world.is_main:
        print(json.dumps(results))


def _shapes(config):
    from minillm.model import parameter_shapes

    return parameter_shapes(config).values()


def run_json(command):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"scaling benchmark: {' '.join(command)} failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ring_seconds(n, nbytes, latency, bytes_per_s, rounds=2):
    """Ring allreduce (rounds=2) or reduce-scatter / allgather (rounds=1) of nbytes over n ranks."""
    return rounds * (n - 1) * (latency + nbytes / n / bytes_per_s)


def small_message_seconds(n, latency):
    """An allreduce of a few numbers by recursive doubling: log2(n) rounds of one message."""
    return math.ceil(math.log2(n)) * latency


def model_rows(compute_s, adamw_s, params, tokens_per_rank):
    """Rows (ranks, ZeRO-1, step s, exchange s, tokens/s, speed-up over one process) of the alpha-beta model."""
    rows = []
    for n in (1, 8, 64, 512):
        for zero in (False, True):
            if zero and n == 1:
                continue
            big = ring_seconds(n, 4 * params, NETWORK_LATENCY_S, NETWORK_BYTES_PER_S) if n > 1 else 0.0
            small = 2 * small_message_seconds(n, NETWORK_LATENCY_S) if n > 1 else 0.0  # stop flag, counts
            if zero:
                small += 2 * small_message_seconds(n, NETWORK_LATENCY_S)  # the loss, the squared norm
            update = adamw_s / n if zero else adamw_s
            step = compute_s - adamw_s + update + big + small
            rows.append((n, "yes" if zero else "no", step, big + small, n * tokens_per_rank / step,
                         n * compute_s / step))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (after one untimed)")
    parser.add_argument("--write", action="store_true", help=f"put the tables into BENCHMARKS.md under '{TITLE}'")
    parser.add_argument("--worker", choices=["alone", "threads", "ranks"], help=argparse.SUPPRESS)
    parser.add_argument("--collectives", type=int, metavar="REPEAT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.steps)
    if args.collectives:
        return collectives(args.collectives)

    mpiexec = next((str(p) for p in (Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec"))
                    if p and Path(p).is_file()), None)
    if mpiexec is None:
        sys.exit("scaling benchmark: no mpiexec found: pip install -e \".[mpi]\"")
    this = [sys.executable, "-m", "minillm.bench.scaling", "--steps", str(args.steps)]
    commands = {
        "1 process, 2 BLAS threads": this + ["--worker", "alone"],
        "1 process, 2 threads (default)": this + ["--worker", "threads"],
        "2 ranks, 1 thread each": [mpiexec, "-n", "2", *this, "--worker", "ranks"],
    }
    load_before = os.getloadavg()[0]
    runs = {name: [] for name in commands}
    for round_ in range(args.rounds):
        for name, command in commands.items():
            runs[name].append(run_json(command))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
            f"{name} {1000 * statistics.median(runs[name][-1]['step']):.0f} ms" for name in commands), file=sys.stderr)
    comms = run_json([mpiexec, "-n", "2", *this, "--collectives", "3"])
    load_after = os.getloadavg()[0]

    baseline, default, ranks = commands  # the three runs' names, in order
    median_step = lambda result: statistics.median(result["step"])
    speed = lambda name, against: statistics.median(
        median_step(a) / median_step(r) for r, a in zip(runs[name], runs[against]))
    rows = []
    for name, results in runs.items():
        step = statistics.median(map(median_step, results))
        exchange = statistics.median(statistics.median(r["exchange"]) for r in results)
        rows.append((name, f"{1000 * step:.0f}", f"{results[0]['tokens'] / step:,.0f}", f"{speed(name, baseline):.2f}x",
                     f"{speed(name, default):.2f}x",
                     f"{1000 * exchange:.1f} ({100 * exchange / step:.1f}%)" if name == ranks else ""))
    measured = format_table(
        ["run", "ms per step", "tokens/s", "speed vs 1 process, 2 BLAS threads", "vs the default",
         "exchange ms per step"],
        rows)
    # One rank's step: train.py's default on this machine, 1 process on its 2 cores.
    adamw_small = statistics.median(statistics.median(r["adamw"]) for r in runs[default])
    compute_small = statistics.median(map(median_step, runs[default]))
    params_small = runs[default][0]["params"]
    gb = lambda n: n / 1e9
    collective_rows = [
        ("GPT-2 small gradient, 124M float32", f"{comms['gpt2 bytes'] / 2**20:,.0f} MiB",
         f"{1000 * comms['gpt2 allreduce']:.0f}", f"{1000 * comms['gpt2 zero']:.0f}",
         f"{gb(comms['gpt2 bytes']) / comms['gpt2 allreduce']:.2f}"),
        ("`small` gradient", f"{comms['small bytes'] / 2**20:,.1f} MiB", f"{1000 * comms['small allreduce']:.1f}",
         f"{1000 * comms['small zero']:.1f}", f"{gb(comms['small bytes']) / comms['small allreduce']:.2f}"),
        ("3 numbers", "12 B", f"{1000 * comms['tiny allreduce']:.3f}", "", ""),
    ]
    collective_table = format_table(
        ["2 ranks, this machine", "size", "allreduce ms", "reduce-scatter + allgather ms", "allreduce GB/s"],
        collective_rows)

    # GPT-2 small: its step time on this machine from the training benchmark (1 row of 1024 tokens), its
    # AdamW time scaled from `small`'s by the parameter count (the update is one pass over p, g, m, v).
    gpt2_step = 6.897
    adamw_gpt2 = adamw_small * GPT2_PARAMS / params_small
    model_tables = []
    for name, compute, adamw, params, tokens in (
        ("`small`, 8 rows of 256 tokens per rank", compute_small, adamw_small, params_small, 2048),
        ("GPT-2 small, 1 row of 1024 tokens per rank", gpt2_step, adamw_gpt2, GPT2_PARAMS, 1024),
    ):
        table = format_table(
            ["ranks", "ZeRO-1", "step ms", "exchange ms", "tokens/s", "speed-up over 1 process"],
            [(n, zero, f"{1000 * step:,.0f}", f"{1000 * exchange:,.1f}", f"{tps:,.0f}", f"{speedup:,.1f}x")
             for n, zero, step, exchange, tps, speedup in model_rows(compute, adamw, params, tokens)],
        )
        model_tables.append(f"{name} (compute {1000 * compute:,.0f} ms, of which AdamW {1000 * adamw:,.0f} ms):\n\n"
                            f"{table}")
    round_ratios = [median_step(d) / median_step(r) for r, d in zip(runs[ranks], runs[default])]
    exchange_ranks = statistics.median(statistics.median(r["exchange"]) for r in runs[ranks])
    bandwidth = {name: 2 * 4 * params / NETWORK_BYTES_PER_S for name, params in
                 (("small", params_small), ("gpt2", GPT2_PARAMS))}
    explanation = f"""What the numbers say. On this machine the ranks share its 2 cores. The 2 ranks do the work
of train.py's default 1-process run split the same way (its 2 threads each take half the batch), plus the exchange
({1000 * exchange_ranks:.0f} ms a step here). Round by round their speed against the default was
{", ".join(f"{r:.2f}x" for r in round_ratios)} (median {speed(ranks, default):.2f}x): other work on the machine moved
single runs by as much as that. The 1 process whose matrix products alone use both cores ran at
{speed(baseline, default):.2f}x the default's speed: its element-wise work runs on one core, and two BLAS threads
suffer when another program takes a core (see minillm/blas_threads.py). Across machines each rank brings its
own cores, and the price is the exchange. The bandwidth term of a ring allreduce, 2 (N-1)/N M / beta, \
tends to 2 M / beta whatever N:
{1000 * bandwidth['small']:.1f} ms for `small`'s {4 * params_small / 1e6:.0f} MB of gradient and
{1000 * bandwidth['gpt2']:.0f} ms for GPT-2 small's {4 * GPT2_PARAMS / 1e6:.0f} MB at 100 Gb/s, against steps of
{1000 * compute_small:,.0f} and {1000 * gpt2_step:,.0f} ms computed on 2 cores. The latency term, 2 (N-1) alpha, grows
with N: {1000 * 2 * 511 * NETWORK_LATENCY_S:.1f} ms at 512 ranks. So on CPUs like these the step scales almost
linearly to hundreds of ranks. On GPUs, whose steps are a hundred times shorter, the same bytes would take as long
as the computing or longer: there NCCL, a faster network and overlapping the exchange with the backward pass (not
done here: the allreduce starts after the last backward pass) decide the scaling. ZeRO-1 moves the same bytes (a
reduce-scatter and an allgather are one allreduce), so it does not speed the exchange; it keeps 1/N of the AdamW
moments on each rank (GPT-2 small: {2 * 4 * GPT2_PARAMS / 2**30:.2f} GiB of moments, \
{2 * 4 * GPT2_PARAMS / 8 / 2**30:.2f}
GiB per rank on 8 ranks) and does 1/N of the update, which is why its speed-up exceeds N: each rank skips most of
the optimizer's work. Not modelled: contention in a real network, and ranks slowed by other work (every step waits
for the slowest)."""
    body = f"""{measured}

Medians over {args.rounds} rounds of {args.steps} timed steps of `small` (8 rows of 256 tokens in all), the three runs
timed in turns; speed: the median over rounds of the other run's step time / this run's. \
Exchange: the time a rank spends
in the step's exchanges (the stop flag, the micro-batches' target counts, the one allreduce of the gradients and loss,
with the copies into the flat buffer), waiting for the slower rank included. The machine was shared with other
work while this ran (its load average, over the minute before, was {load_before:.1f} when it started and
{load_after:.1f} when it ended, on {os.cpu_count()} cores), so single figures are noisy; the ratios, from runs
timed in turns, are steadier.

{collective_table}

Collectives measured on 2 ranks after a barrier (median of 3 for GPT-2 small, 60 for the others), through MPICH's
shared memory: this is memory bandwidth, not a network's.

**On paper: many ranks over a 100 Gb/s network.** An alpha-beta model: a message of b bytes takes
alpha + b / beta, with beta = 12.5 GB/s (100 Gb/s) and alpha = {NETWORK_LATENCY_S * 1e6:.0f} us (assumed). A ring
allreduce of M bytes over N ranks takes 2 (N-1) (alpha + M / (N beta)); a reduce-scatter and an allgather take
half of that each, so ZeRO-1 moves the same bytes. A few numbers go by recursive doubling, log2(N) alpha
each: two per step (the stop flag, the target counts), two more with ZeRO-1 (the loss, the squared norm). Each rank
keeps its rows (the batch grows with N) and computes as one 2-core machine like this one does (`small`: the default
1-process run above; GPT-2 small: its step in "Training: step time, MFU and memory", AdamW's share scaled from
`small`'s by the parameter count); ZeRO-1 divides the AdamW update by N. Speed-up: tokens/s over one process's.

{model_tables[0]}

{model_tables[1]}

{explanation}
"""
    print(body)
    if args.write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
