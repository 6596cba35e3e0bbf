"""Text corpora, token arrays, and random training windows (all on the host).

text -> tokenizer -> flat integer token array -> 90/10 train/val split ->
random contiguous windows (x, y) with y = x shifted left by one token.
"""

import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy

from minillm import files
from minillm.checkpoint import atomic_write
from minillm.errors import DataError

TOKEN_FILES = ("train.bin", "val.bin")  # what prepare_splits writes into the out dir


def builtin_corpus():
    """Python's own documentation topics (about 465,000 characters), on every Python install.

    Deterministic: the topics joined in sorted key order, a blank line between them.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path):
    """A UTF-8 text file, or a folder of .txt files (sorted by name, joined by newlines).

    Only regular files are read (see files.open_regular): a FIFO or a device named
    as the corpus, or as a .txt file in the folder, is an error, not a wait or an
    endless read.
    """
    path = Path(path)
    expected = "a UTF-8 text file or a folder of .txt files (--data PATH)"
    if path.is_dir():
        text_files = sorted(path.glob("*.txt"))
        if not text_files:
            raise DataError(f"{path}: the folder has no .txt files; "
                            "point --data at a text file or a folder of .txt files")
    else:
        text_files = [path]
    parts = []
    for file in text_files:
        raw = files.read_regular(file, DataError, expected)
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(
                f"{file}: not UTF-8 text (byte {err.start} is {raw[err.start]:#04x}); "
                "convert it to UTF-8 or choose another file"
            ) from None
    text = "\n".join(parts)
    if not text:
        raise DataError(f"{path}: the text is empty")
    return text


# Named corpora that are downloaded on request only: (address, size in bytes).
DATASETS = {
    "shakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        1_115_394,
    ),
}


def cache_dir():
    """$XDG_CACHE_HOME/minillm, or ~/.cache/minillm."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minillm"


def fetch_dataset(name):
    """Path of a named corpus, downloaded into the cache folder the first time it is asked for."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    url, size = DATASETS[name]
    path = cache_dir() / f"{name}.txt"
    if path.is_file() and path.stat().st_size == size:
        return path
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"could not download the {name} dataset from {url} ({getattr(err, 'reason', err)}); "
            "if you are offline, pass --data PATH to a local copy of the text"
        ) from None
    if len(body) != size:
        raise DataError(f"the {name} download has {len(body):,} bytes, expected {size:,}; try again later")
    atomic_write(path, lambda f: f.write(body))
    return path


def token_dtype(vocab_size):
    """The smallest unsigned integer type that holds every token id."""
    return numpy.uint16 if vocab_size <= 2**16 else numpy.uint32


def write_token_file(path, ids, vocab_size):
    """Token ids as a flat binary file (like nanoGPT's train.bin), written atomically."""
    tokens = numpy.asarray(ids, dtype=token_dtype(vocab_size))
    atomic_write(path, lambda f: f.write(tokens.tobytes()))


def open_token_file(path, vocab_size):
    """A read-only memory map of a token file: batches read only the windows they need."""
    return numpy.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def prepare_splits(text, tokenizer, directory, block_size, val_fraction=0.1, source="the text"):
    """Encode text, write train.bin (first 90%) and val.bin (last 10%), return both memory-mapped.

    With directory None nothing is written and the splits are arrays in memory (the ranks
    of a job other than rank 0, which leave the out dir to it).

    Each split must hold at least one window of block_size + 1 tokens (inputs plus
    the shifted targets); `source` names the text in the error when one does not.
    """
    ids = tokenizer.encode(text)
    n_train = int(len(ids) * (1.0 - val_fraction))
    parts = {"train": ids[:n_train], "val": ids[n_train:]}
    for name, part in parts.items():
        if len(part) < block_size + 1:
            raise DataError(
                f"{source}: the {name} split has {len(part)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use more text or a smaller --block-size"
            )
    if directory is None:
        return [numpy.asarray(part, dtype=token_dtype(tokenizer.vocab_size)) for part in parts.values()]
    splits = []
    for name, part in parts.items():
        path = Path(directory) / f"{name}.bin"
        write_token_file(path, part, tokenizer.vocab_size)
        splits.append(open_token_file(path, tokenizer.vocab_size))
    return splits


def get_batch(tokens, batch_size, block_size, rng):
    """Random windows of one split: x (B, T) and targets y (B, T), int64, on the host.

    Windows start at seeded random offsets and stay inside `tokens`, so a window
    never crosses from one split into the other.
    """
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    windows = numpy.stack([tokens[s : s + block_size + 1] for s in starts]).astype(numpy.int64)
    return windows[:, :-1], windows[:, 1:]
