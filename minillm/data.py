"""Training data on the host: the built-in and named corpora, token files, and random training windows.

corpus (minillm/corpus.py) -> tokenizer -> token files (minillm/prepare.py, in pieces) ->
random contiguous windows (x, y) with y = x shifted left by one token.
"""

import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy

from minillm.checkpoint import atomic_write
from minillm.errors import DataError


def builtin_corpus():
    """Python's own documentation topics (about 465,000 characters), on every Python install.

    Deterministic: the topics joined in sorted key order, a blank line between them.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


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


def open_token_file(path, vocab_size):
    """A read-only memory map of a token file: batches read only the windows they need."""
    return numpy.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def get_batch(tokens, batch_size, block_size, rng):
    """Random windows of one split: x (B, T) and targets y (B, T), int64, on the host.

    Windows start at seeded random offsets and stay inside `tokens`, so a window
    never crosses from one split into the other.
    """
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    windows = numpy.stack([tokens[s : s + block_size + 1] for s in starts]).astype(numpy.int64)
    return windows[:, :-1], windows[:, 1:]
