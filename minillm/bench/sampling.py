"""Sampling speed on the CPU: tokens per second with and without the KV cache.

    python -m minillm.bench.sampling [--write]

Greedy decoding, batch 1, a one-token prompt, float32, random weights (the speed
does not depend on them). The cached and the uncached run of a model are timed
in turns, so that load from other processes falls on both alike; the table
gives the median of the runs. --write puts the table into BENCHMARKS.md.
"""

import argparse
import statistics
import time

import numpy

from minillm import data
from minillm.bench.common import format_table, write_section
from minillm.model import GPT, GPTConfig
from minillm.sampling import generate
from minillm.tokenizers.char import CharTokenizer

TITLE = "Sampling: tokens per second with and without the KV cache"
GPT2_VOCAB = 50257
# Hugging Face transformers, GPT-2 generate() with its KV cache, greedy, 256 new tokens, for
# n_layer 4, n_head 4, n_embd 128, vocab 50257 (n_positions 1024), on a 2-core machine: the figure.
HF_TOKENS_PER_SECOND = 88


def cases():
    """(name, config, new tokens, runs) for each row of the table."""
    char_vocab = CharTokenizer.from_text(data.builtin_corpus()).vocab_size
    baby = dict(n_layer=4, n_head=4, n_embd=128)
    return [
        ("baby", GPTConfig(vocab_size=char_vocab, block_size=64, **baby), 256, 5),
        ("baby, block 320", GPTConfig(vocab_size=char_vocab, block_size=320, **baby), 256, 5),
        ("baby, GPT-2 vocabulary", GPTConfig(vocab_size=GPT2_VOCAB, block_size=1024, **baby), 256, 3),
        ("GPT-2 small", GPTConfig(vocab_size=GPT2_VOCAB, block_size=1024, n_layer=12, n_head=12, n_embd=768), 64, 3),
    ]


def time_both(model, new_tokens, runs):
    """Median seconds with and without the cache (timed in turns), and whether the two gave the same tokens."""
    prompt = numpy.zeros((1, 1), dtype=numpy.int64)
    for use_cache in (True, False):  # warm-up: memory allocator, BLAS threads
        generate(model, prompt, 4, temperature=0, use_cache=use_cache)
    seconds = {True: [], False: []}
    tokens = {}
    for _ in range(runs):
        for use_cache in (True, False):
            start = time.perf_counter()
            tokens[use_cache] = generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
            seconds[use_cache].append(time.perf_counter() - start)
    same = numpy.array_equal(tokens[True], tokens[False])
    return statistics.median(seconds[True]), statistics.median(seconds[False]), same


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"put the table into BENCHMARKS.md under '{TITLE}'")
    args = parser.parse_args(argv)

    headers = ["model", "n_layer/n_head/n_embd", "vocab", "block", "new tokens", "runs",
               "cached tok/s", "uncached tok/s", "speedup", "same tokens"]
    rows = []
    for name, config, new_tokens, runs in cases():
        model = GPT(config, seed=0, dtype="float32")
        cached, uncached, same = time_both(model, new_tokens, runs)
        rows.append([
            name, f"{config.n_layer}/{config.n_head}/{config.n_embd}", config.vocab_size, config.block_size,
            new_tokens, runs, f"{new_tokens / cached:.0f}", f"{new_tokens / uncached:.1f}",
            f"{uncached / cached:.1f}x", "yes" if same else "no",
        ])
        print(format_table(headers, rows[-1:]).splitlines()[-1], flush=True)

    table = format_table(headers, rows)
    notes = f"""
Greedy, batch 1, a one-token prompt, float32, random weights; medians of the runs, the cached and
uncached run of each model timed in turns. "same tokens": the two paths chose the same tokens.

- **baby** (block 64): after 64 tokens the window slides every step. Position embeddings are learned
  and added at the input, so every cached key and value goes stale and the cache is rebuilt by a
  64-token prefill each step: past the window, a cached step costs about as much as an uncached one.
  That is the price of samples identical to the full forward's.
- **baby, block 320**: the same model with room for all 257 positions: no rebuild.
- **baby, GPT-2 vocabulary**: the shape of the Hugging Face comparison. transformers' GPT-2 `generate`
  with its KV cache, same shape, greedy, 256 new tokens, measured {HF_TOKENS_PER_SECOND} tokens/s on a
  2-core machine (the issue's figure, not measured here).
- **GPT-2 small**: 64 new tokens instead of 256 for both paths, to keep the uncached runs short.
"""
    print()
    print(table)
    if args.write:
        write_section(TITLE, table + "\n" + notes)
        print(f"\nwritten to BENCHMARKS.md under '{TITLE}'")


if __name__ == "__main__":
    main()
