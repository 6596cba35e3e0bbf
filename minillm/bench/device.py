"""Speed on one device (a GPU by default): matmul ceiling, training tokens/s and MFU, sampling tokens/s.

    python -m minillm.bench.device [--device cuda] [--write]

The ceiling is the measured float32 rate of a 4096 x 4096 matrix product through
the device's array module. A training step is forward, backward, gradient clipping
and AdamW on one batch, as train.py runs it on a GPU (one thread); FLOPs are
the matrix products' (bench/roofline.py), MFU their rate over the ceiling. GPT-2
small trains with the largest batch of 64, 32, 16, ... that fits. Each step is timed
in turns with the same step on the plain array code (fused kernels off) and on the
reference layers (minillm.layers), and each speedup is the median of the per-round
ratios. Sampling is greedy with the KV cache, batch 1, on the device and, for
comparison, on this machine's CPU.
Every clock is read after synchronising the device. CuPy computes float32 matrix
products in full float32 unless CUPY_TF32=1 is set: the ceiling and the steps
then use TF32 alike.
"""

import argparse
import os
import statistics
import time

import numpy

from minillm import backend
from minillm.bench.common import format_table, interleaved_times, machine_description, median_seconds, write_section
from minillm.bench.roofline import training_flops
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW, clip_grad_norm
from minillm.sampling import generate

TITLE = "GPU: training and sampling speed"
CONFIGS = {
    # name: (model, the batch sizes to try, largest first)
    "small": (GPTConfig(vocab_size=103, block_size=256, n_layer=6, n_head=6, n_embd=384), (64,)),
    "gpt2": (GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), (64, 32, 16, 8, 4, 2, 1)),
}


def matmul_gflops(device, n=4096):
    xp = backend.array_module(device)
    a = xp.asarray(numpy.random.default_rng(0).random((n, n), dtype=numpy.float32))
    return 2 * n**3 / median_seconds(lambda: a @ a, repeat=10, sync=lambda: backend.synchronize(device)) / 1e9


def training_step(config, batch_size, device, reference=False):
    """One training step's function: the batch is copied to the device once, as in train.py."""
    model = GPT(config, seed=0, device=device, reference=reference)
    optimizer = AdamW(model.params, lr=1e-4, reference=reference)
    idx = numpy.random.default_rng(0).integers(0, config.vocab_size, (batch_size, config.block_size))

    def step():
        model(idx, idx)
        grads = model.backward()
        clip_grad_norm(grads, 1.0)
        optimizer.step(grads)

    return step


def plain(step):
    """step() with fused kernels off: the plain array code on the device."""
    def plain_step():
        with backend.fused_kernels(False):
            step()
    return plain_step


def train_row(name, device, steps, gflops_ceiling):
    """A table row for one configuration, with the largest batch that fits in the device's memory."""
    config, batch_sizes = CONFIGS[name]
    sync = lambda: backend.synchronize(device)
    for batch_size in batch_sizes:
        if device != "cpu":  # what the last attempt left in CuPy's pool goes back to the device
            backend.array_module(device).get_default_memory_pool().free_all_blocks()
        try:
            step = training_step(config, batch_size, device)
            reference = training_step(config, batch_size, device, reference=True)
            times = interleaved_times({"fused": step, "plain": plain(step), "reference": reference}, steps, sync)
            break
        except MemoryError:  # CuPy's OutOfMemoryError is one
            step = reference = None  # the failed attempt's arrays go before the next, smaller one
            continue
    else:
        return [name, "-", "does not fit", "", "", "", "", "", "", ""]
    seconds = statistics.median(times["fused"])
    speedup = lambda other: f"{statistics.median(o / f for f, o in zip(times['fused'], times[other])):.2f}x"
    tokens = batch_size * config.block_size
    achieved = training_flops(config, batch_size).products / seconds / 1e9
    return [name, batch_size, f"{1000 * seconds:.1f}", f"{tokens / seconds:,.0f}", f"{achieved:,.0f}",
            f"{100 * achieved / gflops_ceiling:.0f}%",
            f"{1000 * statistics.median(times['plain']):.1f}", speedup("plain"),
            f"{1000 * statistics.median(times['reference']):.1f}", speedup("reference")]


def sampling_tokens_per_second(config, device, new_tokens):
    model = GPT(config, seed=0, device=device).eval()
    prompt = numpy.zeros((1, 1), dtype=numpy.int64)
    generate(model, prompt, 4, temperature=0)  # warm-up: kernels, memory pool
    times = []
    for _ in range(3):
        backend.synchronize(device)
        start = time.perf_counter()
        generate(model, prompt, new_tokens, temperature=0)
        backend.synchronize(device)
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.device", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5,
                        help="timed rounds per configuration, each a fused, a plain and a reference step (medians)")
    parser.add_argument("--new-tokens", type=int, default=100, help="tokens sampled per timed run (0: no sampling)")
    parser.add_argument("--write", action="store_true", help=f"put the tables into BENCHMARKS.md under '{TITLE}'")
    args = parser.parse_args(argv)
    device = backend.resolve_device(args.device)
    tf32 = device != "cpu" and os.environ.get("CUPY_TF32") == "1"

    ceiling = matmul_gflops(device)
    rows = [train_row(name, device, args.steps, ceiling) for name in args.configs]
    describe = device
    if device != "cpu":
        cupy = backend.array_module(device)
        describe = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode() + f", CuPy {cupy.__version__}"
    tables = [format_table(["config", "batch", "ms/step", "tokens/s", "GFLOP/s", "MFU", "plain ms/step",
                            "fused speedup", "reference ms/step", "fast speedup"], rows)]
    if args.new_tokens:
        gpt2 = CONFIGS["gpt2"][0]
        on_device = sampling_tokens_per_second(gpt2, device, args.new_tokens)
        sampling = [[device, f"{on_device:,.1f}"]]
        if device != "cpu":
            on_cpu = sampling_tokens_per_second(gpt2, "cpu", args.new_tokens)
            sampling += [["cpu (same machine)", f"{on_cpu:,.1f}"], [f"{device} / cpu", f"{on_device / on_cpu:.1f}x"]]
        tables.append(format_table(["sampling, GPT-2 small shape, batch 1, KV cache", "tokens/s"], sampling))
    body = "\n\n".join([
        f"Device: {describe}; host: {machine_description()}. float32 matmul ceiling (4096 x 4096"
        f"{', TF32' if tf32 else ''}): {ceiling:,.0f} GFLOP/s.",
        *tables,
    ])
    if args.write:
        write_section(TITLE + (" (TF32 matrix products)" if tf32 else ""), body)
    print(body)


if __name__ == "__main__":
    main()
