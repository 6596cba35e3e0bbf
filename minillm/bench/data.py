"""Preparing a large corpus: throughput and peak memory of making train.bin and val.bin, beside Hugging Face.

    python -m minillm.bench.data [--sizes 100,1000] [--write]

For each size (MB), a corpus is generated on the fly: random slices of the built-in corpus
(Python's documentation topics) written one after another, so its words are those of that
text (a few tens of thousands of distinct chunks: a real corpus has more, so its BPE encoding
finds fewer chunks in the tokenizer's cache). Each measurement runs in a fresh process, which
reports its own peak resident memory (minillm.system.resident_memory), before and after:

    char            prepare.prepare with a character vocabulary: one read for the digest, the
                    characters and the split, one to encode and write
    bpe             the same with --tokenizer bpe --vocab-size 4096: the vocabulary learned on at
                    most 32 million characters of the training split, then the encoding
    bpe, given      the same vocabulary given (learned by the row above): reading, encoding, writing
    HF 1 thread     Hugging Face `tokenizers` with the same vocabulary and merges, encoding the same
    HF all threads  text cut at the same safe places (encode_batch of 100 pieces of 10,000 characters
                    at a time; RAYON_NUM_THREADS=1 for one thread); its ids are checked equal to ours
                    on the first batch; nothing written
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minillm import data, prepare, system
from minillm.bench.common import format_table, write_section
from minillm.corpus import Corpus
from minillm.tokenizers import from_dict
from minillm.tokenizers.choice import Recipe

TITLE = "Preparing a large corpus"
MB = 1e6
VOCAB_SIZE = 4096
SLICE = 200_000  # characters per random slice of the built-in corpus
HF_BATCH = 100  # pieces per encode_batch: 1 MB, so that its encodings (tens of bytes a token) are never many


def write_corpus(path, megabytes, seed=0):
    """A corpus of about `megabytes` MB of random slices of the built-in corpus, written a slice at a time."""
    text, rng, written = data.builtin_corpus(), random.Random(seed), 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        while written < megabytes * MB:
            start = rng.randrange(len(text) - SLICE)
            written += f.write(text[start : start + SLICE])
    return path


def measure_minillm(kind, corpus_path, out_dir, tokenizer_path=""):
    """In a fresh process: prepare the corpus, print JSON with seconds, memory and tokens."""
    choice = Recipe(kind, VOCAB_SIZE) if not tokenizer_path else \
        from_dict(json.loads(Path(tokenizer_path).read_text(encoding="utf-8")))
    corpus = Corpus.from_paths(corpus_path)
    before = system.resident_memory()[1]
    start = time.perf_counter()
    prepared = prepare.prepare(corpus, choice, 64, out_dir, show_progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "before": before, "peak": system.resident_memory()[1],
                      "tokens": len(prepared.train) + len(prepared.val),
                      "token_bytes": (len(prepared.train) + len(prepared.val)) * prepared.train.dtype.itemsize}))


def measure_hugging_face(corpus_path, tokenizer_path):
    """In a fresh process: Hugging Face's encoding of the corpus in 1 MB pieces, JSON as measure_minillm's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ours = from_dict(json.loads(Path(tokenizer_path).read_text(encoding="utf-8")))
    with tempfile.TemporaryDirectory() as folder:
        vocab, merges = ours.save(folder)
        theirs = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    theirs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    theirs.decoder = decoders.ByteLevel()
    theirs.add_special_tokens(list(ours.special_tokens))
    pieces = prepare.safe_pieces(small_pieces(Corpus.from_paths(corpus_path).pieces("\n")), ours.special_tokens)
    before = system.resident_memory()[1]
    start, tokens, batch = time.perf_counter(), 0, []
    for piece in pieces:
        batch.append(piece)
        if len(batch) == HF_BATCH:
            tokens += encode_batch(theirs, ours, batch, check=not tokens)
            batch = []
    tokens += encode_batch(theirs, ours, batch, check=not tokens)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "before": before, "peak": system.resident_memory()[1],
                      "tokens": tokens, "token_bytes": 0}))


def small_pieces(pieces, size=10_000):
    """The same text in pieces of at most `size` characters: Hugging Face's fastest size here (1,000 to 10,000
    characters ran at 1.6-1.7 MB/s on one thread, 1 MB pieces at 1.0)."""
    for piece in pieces:
        for start in range(0, len(piece), size):
            yield piece[start : start + size]


def encode_batch(theirs, ours, batch, check):
    """Tokens of Hugging Face's encode_batch of the pieces; with check, its ids compared with ours first (untimed
    work would be a few ms: the first batch only)."""
    encodings = theirs.encode_batch(batch)
    if check and [encoding.ids for encoding in encodings] != [ours.encode(piece) for piece in batch]:
        raise SystemExit("Hugging Face's ids differ from ours: the comparison would not be of the same work")
    return sum(len(encoding.ids) for encoding in encodings)


def run_fresh(function, *args, env=None):
    """This module's function(*args) in a new Python process: its JSON result."""
    command = f"from minillm.bench.data import {function}; {function}(*{list(map(str, args))!r})"
    result = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{function} failed:\n{result.stderr}")
    return json.loads(result.stdout)


def hugging_face_installed():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def row(name, size, result):
    peak = result["peak"]
    memory = ["not reported here"] * 2 if peak is None else \
        [f"{peak / MB:,.0f} MB", f"{(peak - result['before']) / MB:,.0f} MB"]
    token_files = f"{result['token_bytes'] / MB:,.0f} MB" if result["token_bytes"] else "-"
    return [f"{size / MB:,.0f} MB", name, f"{result['seconds']:.1f}", f"{size / MB / result['seconds']:.1f}",
            f"{result['tokens']:,}", token_files, *memory]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.data", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="corpus sizes in MB, comma-separated (default: 100,1000)")
    parser.add_argument("--write", action="store_true", help=f"put the table into BENCHMARKS.md under '{TITLE}'")
    args = parser.parse_args(argv)
    sizes = [float(size) for size in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for megabytes in sizes:
            corpus = write_corpus(folder / f"corpus-{megabytes:g}.txt", megabytes)
            size = corpus.stat().st_size
            results = {}
            for kind in ("char", "bpe"):
                out = folder / f"{kind}-{megabytes:g}"
                out.mkdir()
                results[kind] = run_fresh("measure_minillm", kind, corpus, out)
                rows.append(row(kind if kind == "char" else f"bpe {VOCAB_SIZE:,}", size, results[kind]))
                print(format_table(HEADERS, rows[-1:]), flush=True)
            tokenizer = folder / f"bpe-{megabytes:g}" / prepare.TOKENIZER_FILE
            given = folder / f"given-{megabytes:g}"
            given.mkdir()
            result = run_fresh("measure_minillm", "bpe", corpus, given, tokenizer)
            rows.append(row("bpe, vocabulary given", size, result))
            if hugging_face_installed():
                for name, threads in (("HF 1 thread", {"RAYON_NUM_THREADS": "1"}), ("HF all threads", {})):
                    result = run_fresh("measure_hugging_face", corpus, tokenizer, env=os.environ | threads)
                    rows.append(row(name, size, result))
            for path in folder.glob("*/*.bin"):
                path.unlink()
            corpus.unlink()
    table = format_table(HEADERS, rows)
    print(table)
    notes = f"""
Each row is one fresh process ({os.cpu_count()} cores here); MB/s is corpus MB per second of the whole
preparation; "peak RSS" is the process's high-water mark and "peak - start" its growth during the
preparation (the interpreter and imports excluded). The token files are written, not held: memory stays
a few tens of MB whatever the corpus's size. Rows: see `python -m minillm.bench.data --help` and the
module's docstring (`minillm/bench/data.py`).

{table}
"""
    if args.write:
        write_section(TITLE, notes)
        print(f"wrote the '{TITLE}' section of BENCHMARKS.md")


HEADERS = ["corpus", "tokenizer", "seconds", "MB/s", "tokens", "token files", "peak RSS", "peak - start"]


if __name__ == "__main__":
    main()
