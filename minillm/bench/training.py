"""Training speed and memory on the CPU, side by side with PyTorch when it is installed.

    python -m minillm.bench.training [--write] [--configs baby small gpt2]

For each configuration: the median time of a full training step (forward,
backward, gradient clipping, AdamW) over all CPU threads, tokens per second, the
step's FLOPs split into matrix products and the rest (bench/roofline.py counts
them from the shapes), MFU (the products' FLOPs per second over the matrix-product
rate measured in the same run), the step's matrix products replayed alone at their
shapes (bench/roofline.py's ProductsReplay: the least the step can take at these
shapes) and the rest of the step, an evaluation batch against a step, and the peak
memory of a training process against an analytic estimate. PyTorch, when importable,
runs the same model with the same shapes and thread count, and the same products alone
with its own matmul; its steps and products, minillm's products alone and the evaluation
batches are interleaved with minillm's steps so that load from elsewhere falls on all alike.
Then a per-layer breakdown of one step of the first configuration.
"""

import argparse
import importlib.metadata
import itertools
import json
import statistics
import subprocess
import sys
import time

import numpy

from minillm import parallel, system
from minillm.bench.common import format_table, interleaved_times, write_section
from minillm.bench.configs import CONFIGS, benchmark_tokens
from minillm.bench.roofline import ProductsReplay, best_ceilings, fraction, measure_ceilings, rest_bytes, training_flops
from minillm.fast import attention, cross_entropy, dropout, embedding, gelu, layernorm, linear, mlp, softmax
from minillm.model import GPT, parameter_shapes
from minillm.optim import AdamW
from minillm.readback import NonfiniteWatch
from minillm.training import TrainConfig, estimate_loss, train_step

TITLE = "Training: step time, MFU and memory, minillm and PyTorch"
# The speed over PyTorch's step each configuration aims at, and the most an evaluation batch may cost
# against a training step: what the report sets the measured bounds against.
SPEED_TARGETS = {"baby": 1.3, "small": 1.3, "gpt2": 1.2}
EVAL_TARGET = 0.4


def analytic_memory_bytes(config, batch_size):
    """Parameters, gradients and the two AdamW moments, plus what the forward keeps for backward.

    Per block (dropout off), counted in values: LayerNorm 1 x_hat (BTC) + its output (BTC),
    attention q, k, v (3 BTC) + its weights P (n_head B W) + head outputs (BTC),
    LayerNorm 2 x_hat + output (2 BTC), MLP input of GELU, tanh and GELU output (3 x 4 BTC):
    20 BTC + n_head B W, where W is the part of the T x T weights that the causal blocks
    keep (attention.QUERY_BLOCK queries a block). Then the final LayerNorm (2 BTC) and the
    logits, the softmax and the logits' gradient (3 BTV). Four bytes a value (float32).
    """
    B, T, C, V = batch_size, config.block_size, config.n_embd, config.vocab_size
    params = sum(int(numpy.prod(shape)) for shape in parameter_shapes(config).values())
    starts = range(0, T, attention.QUERY_BLOCK)
    ends = [min(a + attention.QUERY_BLOCK, T) for a in starts]
    kept_weights = sum((b - a) * b for a, b in zip(starts, ends))
    per_block = 20 * B * T * C + config.n_head * B * kept_weights
    activations = config.n_layer * per_block + 2 * B * T * C + 3 * B * T * V
    return 4 * (4 * params + activations)


def training_step(config, batch_size, threads, reference=False):
    """A function that runs one minillm training step, train.py's train_step on a fixed batch."""
    return step_and_evaluation(config, batch_size, threads, reference)[0]


def step_and_evaluation(config, batch_size, threads, reference=False):
    """(step, evaluate): training_step's function, and one that runs an evaluation batch of the step's
    shape on the same model as train.py's estimate_loss runs it: on the ShardedGPT that training's
    loop() passes it with more than one thread, so the shards' forward passes run at once there too."""
    system.keep_freed_memory()
    model = GPT(config, seed=0, reference=reference)
    optimizer = AdamW(model.params, lr=1e-4, reference=reference)
    stepper = model if threads == 1 else parallel.ShardedGPT(model, threads)
    idx = benchmark_tokens(config, batch_size)
    cfg = TrainConfig(lr=1e-4, min_lr=1e-4, warmup_iters=0, grad_clip=1.0)  # a constant rate: speed, not learning
    watch = NonfiniteWatch("cpu", model.dtype, out_dir=None)
    steps = itertools.count()

    def step():
        train_step(stepper, optimizer, lambda rng: (idx, idx), next(steps), cfg, watch)

    return step, lambda: estimate_loss(stepper, [(idx, idx)])


def installed_version(package):
    """The package's version, or None when it is not installed (without importing it)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_memory(name, threads):
    """(baseline, peak) resident bytes of a fresh process that runs three training steps."""
    command = [sys.executable, "-m", "minillm.bench.training", "--memory-probe", name, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    return report["baseline"], report["peak"]


def memory_probe(name, threads):
    config, batch_size, _ = CONFIGS[name]
    importlib.import_module("numpy.random")  # loaded on first use: 5 MiB of library code, not training memory
    baseline, _ = system.resident_memory()
    step = training_step(config, batch_size, threads)
    for _ in range(3):
        step()
    print(json.dumps({"baseline": baseline, "peak": system.resident_memory()[1]}))


def layer_breakdown(config, batch_size, steps=3):
    """Rows (layer, forward ms, backward ms) per training step as one shard, from the real step.

    Every layer module's forward and backward are wrapped with a timer for the
    duration; a layer's own time excludes the layers it calls (attention's
    linear projections and softmax count as linear and softmax).
    """
    modules = [attention, cross_entropy, dropout, embedding, gelu, layernorm, linear, mlp, softmax]
    own = {}  # (layer, pass) -> seconds
    stack = [0.0]  # time spent in children of the calls in progress

    def timed(name, pass_, fn):
        def wrapper(*args, **kwargs):
            stack.append(0.0)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            elapsed = time.perf_counter() - start
            children = stack.pop()
            own[name, pass_] = own.get((name, pass_), 0.0) + elapsed - children
            stack[-1] += elapsed
            return result

        return wrapper

    originals = {m: (m.forward, m.backward) for m in modules}
    step = training_step(config, batch_size, threads=1)
    step()
    try:
        for m in modules:
            name = m.__name__.rsplit(".", 1)[-1]
            m.forward, m.backward = timed(name, "forward", m.forward), timed(name, "backward", m.backward)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = (time.perf_counter() - start) / steps
    finally:
        for m, (forward, backward) in originals.items():
            m.forward, m.backward = forward, backward
    names = sorted({name for name, _ in own}, key=lambda n: -(own.get((n, "forward"), 0) + own.get((n, "backward"), 0)))
    rows = [(n, 1000 * own.get((n, "forward"), 0.0) / steps, 1000 * own.get((n, "backward"), 0.0) / steps)
            for n in names]
    rest = total - sum(f + b for _, f, b in rows) / 1000
    return rows + [("optimizer, clipping and the rest", 1000 * rest, 0.0)], total


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.training", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["baby", "small", "gpt2"], choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=system.usable_cores())
    parser.add_argument("--write", action="store_true", help=f"put the tables into BENCHMARKS.md under '{TITLE}'")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.threads)
    torch_version = installed_version("torch")

    before = measure_ceilings(threads=args.threads)
    print(f"float32 2048x2048 matrix product: {before.matmul_gflops:.0f} GFLOP/s; {args.threads} threads")
    measured = {}
    for name in args.configs:
        measured[name] = measure_config(name, args.threads, torch_version)
        ms = {k: f"{1000 * statistics.median(v):.0f}" for k, v in measured[name]["times"].items()}
        print(f"{name}: " + ", ".join(f"{k} {v} ms" for k, v in ms.items()), flush=True)
    after = measure_ceilings(threads=args.threads)
    ceilings = best_ceilings(before, after)
    ceiling = ceilings.matmul_gflops
    rows, bounds = [], []
    for name in args.configs:
        row, bound = report_row(name, measured[name], ceilings)
        rows.append(row)
        if bound:
            bounds.append(bound)
    table = format_table(HEADERS, rows)
    bounds_text = "The products alone against PyTorch's step:\n\n" + "\n".join(bounds) + "\n\n" if bounds else ""
    first = args.configs[0]
    breakdown, total = layer_breakdown(CONFIGS[first][0], CONFIGS[first][1])
    layers = format_table(
        ["layer", "forward ms", "backward ms", "share"],
        [[n, f"{f:.1f}", f"{b:.1f}", f"{100 * (f + b) / 1000 / total:.0f}%"] for n, f, b in breakdown],
    )
    report = (
        f"Ceilings, measured before and after the rows ({args.threads} BLAS threads, the best of 5 each time, "
        f"then the faster of the two): matrix product {ceiling:.0f} GFLOP/s (float32 2048x2048; "
        f"{before.matmul_gflops:.0f} before, {after.matmul_gflops:.0f} after), matrix-vector product "
        f"{ceilings.matvec_gbps:.1f} GB/s, elementwise pass {ceilings.elementwise_gbps:.1f} GB/s "
        "(512 MiB each; bench/roofline.py). "
        f"PyTorch: {'eager mode, ' + torch_version if torch_version else 'not installed'}, in a process of its own, "
        "its model initialised as minillm's (GPT-2's; bench/torch_reference.py says why).\n\n"
        f"{table}\n\n"
        f"ms: median of {', '.join(f'{CONFIGS[n][2]} ({n})' for n in args.configs)} full steps (forward, backward, "
        "clipping, AdamW), minillm and PyTorch timed in turns; speed: the median over those rounds of PyTorch's "
        "time / minillm's (above 1: minillm is faster). GFLOP: one step's matrix products (forward and backward; "
        "attention's over the (query, key) pairs of its causal blocks) + the rest (elementwise work, reductions, "
        "clipping and AdamW), counted from the shapes by bench/roofline.py; GFLOP/s: both over the median step "
        "time; MFU: the products' rate over the matrix-product ceiling. Products alone: the step's matrix "
        "products, each at its own shape on random operands, split over the threads as the step splits its batch "
        "(bench/roofline.py, ProductsReplay), timed between the steps (median): the least a step of these shapes "
        "can take; of ceiling: their rate over the matrix-product ceiling (small products run below a large "
        "one's rate); the rest: the step's median less theirs (elementwise work, copies, the optimizer, "
        "waiting); its floor: the bytes it moves were each layer one pass over its arrays (bench/roofline.py, "
        "rest_bytes: what code that runs a layer at a time, NumPy's or PyTorch's eager mode, moves at the least) "
        "over the matrix-vector product's streaming rate, the memory's. PyTorch: products alone + the rest: the "
        "same products (and operands) with PyTorch's matmul in PyTorch's process, timed in turn with the others, "
        "and PyTorch's step less them: its compiled layers (one kernel each, attention one fused kernel), "
        "copies and AdamW. eval / step: the median over the rounds of "
        "one evaluation batch of the step's shape, as "
        "train.py's estimate_loss runs it (forward only, nothing kept), over that round's step; at most "
        f"{EVAL_TARGET} is the aim. Memory: peak resident memory of a "
        "fresh training process less its size before building the model, against the analytic estimate "
        "(parameters, gradients, AdamW moments, activations).\n\n"
        f"{bounds_text}"
        f"Where one `{first}` step's time goes, the whole batch as one shard (element-wise work on one core, "
        f"matrix products on all; {1000 * total:.0f} ms a step with the timers; a layer's own time, without the "
        f"layers it calls):\n\n{layers}\n"
    )
    print("\n" + report)
    if args.write:
        write_section(TITLE, report)


def measure_config(name, threads, torch_version):
    """{"times": {function: [seconds per round]}, "memory": (baseline, peak)} for one configuration.

    minillm's step, its products alone, an evaluation batch and, with PyTorch installed,
    PyTorch's step and its products alone, timed in turns (interleaved_times).
    """
    config, batch_size, steps = CONFIGS[name]
    step, evaluate = step_and_evaluation(config, batch_size, threads)
    products_alone = ProductsReplay(config, batch_size, threads)
    functions = {"minillm": step, "products alone": products_alone, "eval": evaluate}
    if torch_version:
        from minillm.bench.torch_reference import TorchProcess

        torch_process = TorchProcess(name, threads)
        functions["pytorch"] = torch_process.step
        functions["pytorch products alone"] = torch_process.products
    try:
        times = interleaved_times(functions, steps)
    finally:
        products_alone.close()
        if torch_version:
            torch_process.close()
    return {"times": times, "memory": peak_memory(name, threads)}


def report_row(name, measured, ceilings):
    """(the table's row for configuration `name`, its speed_bound line or None without PyTorch)."""
    config, batch_size, _ = CONFIGS[name]
    times = measured["times"]
    ceiling = ceilings.matmul_gflops
    ours = statistics.median(times["minillm"])
    products = statistics.median(times["products alone"])
    eval_per_step = statistics.median(e / m for e, m in zip(times["eval"], times["minillm"]))
    flops = training_flops(config, batch_size)
    rest_floor = rest_bytes(config, batch_size) / (ceilings.matvec_gbps * 1e9)
    torch_ms = speed = torch_split = "-"
    bound = None
    if "pytorch" in times:
        torch_step, torch_products = (statistics.median(times[k]) for k in ("pytorch", "pytorch products alone"))
        torch_rest = torch_step - torch_products
        torch_ms = f"{1000 * torch_step:.0f}"
        torch_split = f"{1000 * torch_products:.0f} + {1000 * torch_rest:.0f}"
        # The median of each round's ratio: a slow spell of the machine falls on both steps of a round.
        speed = f"{statistics.median(t / m for t, m in zip(times['pytorch'], times['minillm'])):.2f}x"
        if name in SPEED_TARGETS:
            bound = speed_bound(name, torch_step, ours, products, rest_floor, torch_rest)
    baseline, peak = measured["memory"]
    estimate = analytic_memory_bytes(config, batch_size)
    row = [
        name, f"{config.n_layer}/{config.n_head}/{config.n_embd}/{config.block_size}/{batch_size}",
        f"{1000 * ours:.0f}", torch_ms, speed, f"{batch_size * config.block_size / ours:,.0f}",
        f"{flops.products / 1e9:.1f} + {flops.rest / 1e9:.2f}", f"{flops.total / ours / 1e9:.0f}",
        f"{100 * fraction(flops.products / ours / 1e9, ceiling):.0f}%",
        f"{1000 * products:.0f}", f"{100 * fraction(flops.products / products / 1e9, ceiling):.0f}%",
        f"{1000 * (ours - products):.0f}", f"{1000 * rest_floor:.0f}", torch_split, f"{eval_per_step:.2f}",
        f"{(peak - baseline) / 2**20:.0f} / {estimate / 2**20:.0f} MiB ({(peak - baseline) / estimate:.2f}x)"
        if None not in (baseline, peak) else "not available on this system",
    ]
    return row, bound


def speed_bound(name, torch_seconds, step_seconds, products_seconds, rest_floor_seconds, torch_rest_seconds):
    """A line of the report: the step that SPEED_TARGETS[name] x PyTorch needs against the products alone.

    N x PyTorch needs a step of at most PyTorch's seconds / N; the products alone are the least
    a step takes, so PyTorch's seconds / the products' is the most speed their rate allows. The
    rest's floor (rest_bytes at the streaming rate) is the least the rest takes a layer at a time;
    PyTorch's rest (its step less its products alone) is what compiled layers take for the same work.
    """
    target = SPEED_TARGETS[name]
    needed = torch_seconds / target
    left = needed - products_seconds
    verdict = (f"leaving {1000 * left:.0f} ms for the rest (now {1000 * (step_seconds - products_seconds):.0f} ms, "
               f"its floor {1000 * rest_floor_seconds:.0f} ms)" if left > 0
               else "already more: no rest at all would reach the target")
    if 0 < left < rest_floor_seconds:
        verdict += ": beyond this machine for code that runs each layer as its own pass over memory"
    elif 0 < left < torch_rest_seconds:
        verdict += (f": {torch_rest_seconds / left:.1f}x less than PyTorch's compiled layers take for it "
                    f"({1000 * torch_rest_seconds:.0f} ms)")
    return (f"- {name}: {target}x PyTorch's {1000 * torch_seconds:.0f} ms needs a step of at most "
            f"{1000 * needed:.0f} ms; the products alone take {1000 * products_seconds:.0f} ms, {verdict}; "
            f"with no rest at all the step would be {torch_seconds / products_seconds:.2f}x PyTorch")


HEADERS = ["config", "L/H/C/T/B", "minillm ms", "PyTorch ms", "speed", "tokens/s", "GFLOP: products + rest",
           "GFLOP/s", "MFU", "products alone ms", "products alone: of ceiling", "the rest ms", "the rest: floor ms",
           "PyTorch: products alone + the rest ms", "eval / step", "memory: measured / analytic"]

if __name__ == "__main__":
    main()
