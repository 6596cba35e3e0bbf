"""Tokenizers: text <-> lists of integer ids.

Every tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, and `to_dict()` (JSON-serialisable, stored in checkpoints);
`from_dict(d)` rebuilds whichever kind `d` describes.
"""

from minillm.tokenizers.char import CharTokenizer

KINDS = {"char": CharTokenizer}


def from_dict(data):
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    return KINDS[kind].from_dict(data)
