"""Sampling speed on the CPU: tokens per second with and without the KV cache, quiet and beside a busy process.

    python -m minillm.bench.sampling [--write]

Greedy decoding, batch 1, a one-token prompt, float32, random weights (the speed
does not depend on them). In each round the cached run beside a process that
keeps one core busy, the uncached run, the cached run at batch 8, the cached run
and the same sample drawn by Hugging Face transformers (when it is installed: in
a process of its own, from the same weights written by save_pretrained) are timed
in turn, so that a slow spell of the machine falls on all of them alike; the table
gives medians over the rounds. Each cached run stands beside its streaming bound:
the bytes it reads per token (bench/roofline.py) at the rate of a large
matrix-vector product measured before the rows. Beside the busy process the cached run is also timed with the
BLAS thread count left as it is (threads_unwatched), as sampling ran before
minillm.blas_threads. --write puts the table into BENCHMARKS.md.
"""

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy

from minillm import blas_threads, data, hf
from minillm.bench.common import format_table, write_section
from minillm.bench.roofline import (
    StreamingRate,
    decoding_bytes_per_token,
    fraction,
    measure_ceilings,
    product_stream_gbps as streaming_gbps,
)
from minillm.bench.training import installed_version
from minillm.model import GPT, GPTConfig
from minillm.sampling import generate
from minillm.tokenizers.char import CharTokenizer

TITLE = "Sampling: tokens per second with and without the KV cache"
GPT2_VOCAB = 50257
BATCH = 8
HEADERS = ["model", "n_layer/n_head/n_embd", "vocab", "block", "new tokens", "rounds", "cached tok/s", "MB/token",
           "of streaming bound", f"batch {BATCH} tok/s", f"batch {BATCH}: of bound", "uncached tok/s",
           "transformers tok/s", "vs transformers", "busy beside: tok/s", "slowdown", "busy, threads unwatched",
           "same tokens"]


def cases():
    """(name, config, new tokens, rounds) for each row of the table."""
    char_vocab = CharTokenizer.from_text(data.builtin_corpus()).vocab_size
    baby = dict(n_layer=4, n_head=4, n_embd=128)
    return [
        ("baby", GPTConfig(vocab_size=char_vocab, block_size=64, **baby), 256, 5),
        ("baby, block 320", GPTConfig(vocab_size=char_vocab, block_size=320, **baby), 256, 5),
        ("baby, GPT-2 vocabulary", GPTConfig(vocab_size=GPT2_VOCAB, block_size=1024, **baby), 256, 5),
        ("GPT-2 small", GPTConfig(vocab_size=GPT2_VOCAB, block_size=1024, n_layer=12, n_head=12, n_embd=768), 64, 5),
    ]


@contextlib.contextmanager
def busy_core():
    """Another process that keeps one core busy, as long as the block runs."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it start spinning
        yield
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def threads_unwatched():
    """Sampling as it ran before minillm.blas_threads: the BLAS keeps its own thread count throughout."""
    watch_for = blas_threads.watch_for
    blas_threads.watch_for = lambda device: contextlib.nullcontext(blas_threads.Unwatched())
    try:
        yield
    finally:
        blas_threads.watch_for = watch_for


def timed(fn):
    """(seconds, result) of one fn() call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(model, new_tokens, rounds, reference=None, streaming_rate=None):
    """({column: seconds of each round}, the columns whose tokens differed from the first cached run's (in any
    row of the batched run), [the streaming rate in GB/s measured just before each round's cached run]).

    reference: a TransformersProcess on the same weights, or None. streaming_rate: a roofline.StreamingRate,
    or None: the machine's bound, measured beside each run since a shared machine's memory rate drifts.
    """
    def ours(use_cache, batch_size=1):
        """A run of minillm's sampling: (seconds, the tokens of each row)."""
        prompts = numpy.zeros((batch_size, 1), dtype=numpy.int64)
        sample = lambda: generate(model, prompts, new_tokens, temperature=0, use_cache=use_cache)[:, 1:].tolist()
        return lambda: timed(sample)

    def theirs():
        """A run of transformers' sampling, shaped as ours: (seconds, [its one row of tokens])."""
        time_taken, chosen = reference.run()
        return time_taken, [chosen]

    for use_cache, batch_size in ((True, 1), (False, 1), (True, BATCH)):  # warm-up: memory allocator, BLAS threads
        generate(model, numpy.zeros((batch_size, 1), dtype=numpy.int64), 4, temperature=0, use_cache=use_cache)
    seconds = {"cached": [], "uncached": [], "batched": [], "transformers": [], "busy": [], "busy, unwatched": []}
    tokens = {}  # column: the tokens of each row of each quiet run
    rates = []
    for _ in range(rounds):
        # The busy runs first: each run compared with transformers' then follows a quiet one, as transformers' does.
        with busy_core():
            seconds["busy"].append(ours(True)()[0])
            with threads_unwatched():
                seconds["busy, unwatched"].append(ours(True)()[0])
        for column, run in (("uncached", ours(False)), ("batched", ours(True, BATCH)), ("cached", ours(True)),
                            ("transformers", theirs if reference else None)):
            if column == "cached" and streaming_rate is not None:
                rates.append(streaming_rate())
            if run:
                time_taken, rows = run()
                seconds[column].append(time_taken)
                tokens.setdefault(column, []).extend(rows)
    first = tokens["cached"][0]
    return seconds, sorted(column for column, runs in tokens.items() if any(chosen != first for chosen in runs)), rates


def bytes_per_token(config, new_tokens, batch_size):
    """Bytes read per token over a run from a one-token prompt, or None once the window slides.

    The pass that yields the s-th new token has s positions cached, so the mean of
    roofline.decoding_bytes_per_token over s = 0 .. new_tokens - 1. Past block_size each step is a
    prefill of the whole window (see sampling.next_logits), bound by its matrix products instead.
    """
    if new_tokens > config.block_size:
        return None
    return statistics.mean(decoding_bytes_per_token(config, "float32", batch_size, past) for past in range(new_tokens))


def row(name, config, new_tokens, rounds, transformers, streaming_rate):
    """One row of the table for this model; streaming_rate: a roofline.StreamingRate of one row, measured
    beside each round's cached run (the bound that run is held against)."""
    model = GPT(config, seed=0, dtype="float32")
    with tempfile.TemporaryDirectory() as directory:
        reference = None
        # transformers' GPT-2 has no sliding window: it samples only within its block.
        if transformers and new_tokens < config.block_size:
            from minillm.bench.transformers_reference import TransformersProcess

            hf.save_pretrained(model, directory)
            reference = TransformersProcess(directory, new_tokens)
        try:
            seconds, differed, rates = measure(model, new_tokens, rounds, reference, streaming_rate)
        finally:
            if reference:
                reference.close()
    speed = {column: new_tokens / statistics.median(times) for column, times in seconds.items() if times}
    speed["batched"] *= BATCH
    batched_gain = statistics.median(BATCH * c / b for b, c in zip(seconds["batched"], seconds["cached"]))
    one, batched = bytes_per_token(config, new_tokens, 1), bytes_per_token(config, new_tokens, BATCH)
    def of_bound(column, rows, nbytes):
        """The median over the rounds of the run's rate of reading over that round's streaming rate."""
        fractions = [fraction(rows * new_tokens / run * nbytes / 1e9, rate)
                     for run, rate in zip(seconds[column], rates)]
        return f"{100 * statistics.median(fractions):.0f}%"

    # Ratios per round, then their median: a slow spell of the machine falls on both sides of a round.
    versus = statistics.median(h / c for h, c in zip(seconds["transformers"], seconds["cached"])) if reference else None
    slowdown = statistics.median(b / c for b, c in zip(seconds["busy"], seconds["cached"]))
    return [
        name, f"{config.n_layer}/{config.n_head}/{config.n_embd}", config.vocab_size, config.block_size,
        new_tokens, rounds, f"{speed['cached']:.0f}", f"{one / 1e6:.3g}" if one else "-",
        of_bound("cached", 1, one) if one else "-", f"{speed['batched']:.0f} ({batched_gain:.1f}x)",
        of_bound("batched", BATCH, batched) if batched else "-", f"{speed['uncached']:.1f}",
        f"{speed['transformers']:.0f}" if reference else "-", f"{versus:.2f}x" if reference else "-",
        f"{speed['busy']:.0f}", f"{slowdown:.2f}x", f"{speed['busy, unwatched']:.0f}",
        f"no: {', '.join(differed)}" if differed else "yes",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"put the table into BENCHMARKS.md under '{TITLE}'")
    args = parser.parse_args(argv)
    transformers = installed_version("transformers")

    # Measured before the rows, in the same process: the bound each cached run is held against.
    ceilings, one_core = measure_ceilings(), measure_ceilings(threads=1)
    batched_gbps = streaming_gbps(BATCH)
    streaming_rate = StreamingRate(1)
    rows = []
    for name, config, new_tokens, rounds in cases():
        rows.append(row(name, config, new_tokens, rounds, transformers, streaming_rate))
        print(format_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(HEADERS, rows)
    gpt2 = cases()[-1][1]
    weight_bytes = 4 * GPT(gpt2, seed=0, dtype="float32").num_params()
    rate, one_core_rate = 1e9 * ceilings.matvec_gbps, 1e9 * one_core.matvec_gbps
    version = f"version {transformers}" if transformers else "not installed"
    notes = f"""
Greedy, batch 1 (but for the batch {BATCH} column), a one-token prompt, float32, random weights; medians
over the rounds. In each round the cached run beside a process that keeps one core busy (with the BLAS
threads watched, then unwatched), the uncached run, the cached run at batch {BATCH}, the cached run and
transformers' `generate` (with its KV cache, in a process of its own, started and warmed up before the
first round; {version}) take turns, so that both runs compared with each other follow a quiet run.
"vs transformers": the median of the rounds' transformers time / cached time (above 1: minillm is
faster). "slowdown": the median of the rounds' busy / quiet time of the cached run. "busy, threads
unwatched": the cached run beside the busy process with the BLAS keeping its own thread count (all
cores), as sampling ran before minillm/blas_threads.py. "same tokens": every quiet run of the row, each
row of the batched one included, chose the tokens of the first cached run (or which runs did not).

The bound: "MB/token" is what the cached run reads per token it yields, averaged over the run
(bench/roofline.py: every weight once per step, shared by the batch's rows, less all but one row
of the position table; per row its embedding row and the keys and values of the positions so far);
"of streaming bound" is tokens/s x MB/token over the streaming rate of a float32 matrix-vector
product over 512 MiB (all threads, the best of 3), measured again just before each round's cached run, as
this machine's memory rate drifts with what else runs on its host: the median over the rounds of each
round's fraction. Measured once before the rows: {ceilings.matvec_gbps:.1f} GB/s; the matrix product
{ceilings.matmul_gflops:.0f} GFLOP/s, an elementwise pass {ceilings.elementwise_gbps:.1f} GB/s.
"-" where the window slides: each step is then a prefill of the whole window, bound by its matrix
products. "batch {BATCH}": the cached run with {BATCH} rows at once, its tokens/s counting every row's
and, in brackets, the median over the rounds of its tokens/s over the batch-1 run's. The BLAS streams
the weights more slowly for {BATCH} rows than for one: a product with {BATCH} rows over the same 512 MiB read
them at {batched_gbps:.1f} GB/s (a matrix product, which packs the weights, against the matrix-vector
product's {ceilings.matvec_gbps:.1f}), so where the weights dominate a step, {BATCH} rows can give at most
{BATCH * batched_gbps / ceilings.matvec_gbps:.1f}x the tokens/s of one.

- **baby** (block 64): after 64 tokens the window slides every step. Position embeddings are learned
  and added at the input, so every cached key and value goes stale and the cache is rebuilt by a
  64-token prefill each step: past the window, a cached step costs about as much as an uncached one.
  That is the price of samples identical to the full forward's. transformers' GPT-2 does not slide
  its window, so it has no figure here.
- **baby, block 320**: the same model with room for all 257 positions: no rebuild.
- **GPT-2 small**: 64 new tokens instead of 256, to keep the uncached runs short. Each token reads
  all {weight_bytes / 1e6:.0f} MB of float32 weights once. At the streaming rate above, no float32
  decoder could pass {rate / weight_bytes:.0f} tokens/s at batch 1. On one thread, all that a busy process
  beside it leaves, the product streamed {one_core_rate / 1e9:.1f} GB/s: at most
  {one_core_rate / weight_bytes:.0f} tokens/s.
"""
    print()
    print(table)
    print(notes)
    if args.write:
        write_section(TITLE, table + "\n" + notes)
        print(f"\nwritten to BENCHMARKS.md under '{TITLE}'")


if __name__ == "__main__":
    main()
