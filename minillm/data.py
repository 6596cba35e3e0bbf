"""Text corpora, token arrays, and random training windows (all on the host).

text -> tokenizer -> flat integer token array -> 90/10 train/val split ->
random contiguous windows (x, y) with y = x shifted left by one token.
"""

from pathlib import Path

import numpy


class DataError(ValueError):
    """A corpus that cannot be read or is too small to train on."""


def builtin_corpus():
    """Python's own documentation topics (about 465,000 characters), on every Python install.

    Deterministic: the topics joined in sorted key order, a blank line between them.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path):
    """A UTF-8 text file, or a folder of .txt files (sorted by name, joined by newlines)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"{path}: the folder has no .txt files; point --data at a text file or a folder of .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder; pass --data PATH to a UTF-8 text file")
    parts = []
    for file in files:
        raw = file.read_bytes()
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


def token_array(ids, vocab_size):
    """Ids as the smallest unsigned integer array that holds the vocabulary."""
    dtype = numpy.uint16 if vocab_size <= 2**16 else numpy.uint32
    return numpy.asarray(ids, dtype=dtype)


def split(tokens, val_fraction=0.1):
    """(train, val): the first 90% of the tokens, then the last 10%."""
    n_train = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


def check_long_enough(tokens, block_size, name):
    if len(tokens) < block_size + 1:
        raise DataError(
            f"the {name} split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "use more text or a smaller --block-size"
        )


def get_batch(tokens, batch_size, block_size, rng):
    """Random windows of one split: x (B, T) and targets y (B, T), int64, on the host.

    Windows start at seeded random offsets and stay inside `tokens`, so a window
    never crosses from one split into the other.
    """
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    windows = numpy.stack([tokens[s : s + block_size + 1] for s in starts]).astype(numpy.int64)
    return windows[:, :-1], windows[:, 1:]
