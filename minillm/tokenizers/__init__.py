"""Tokenizers: text <-> lists of integer ids.

Every tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `eot_id` (the id of "<|endoftext|>", which separates documents,
or None when the tokenizer has none), and `to_dict()` (JSON-serialisable,
stored in checkpoints); `from_dict(d)` rebuilds whichever kind `d` describes.

    char   CharTokenizer: one id per character of the training text (char.py)
    bpe    BPETokenizer: GPT-2's byte-level BPE, trained here or loaded from GPT-2's files (bpe.py)
"""

from minillm.tokenizers.bpe import BPETokenizer
from minillm.tokenizers.char import CharTokenizer

KINDS = {"char": CharTokenizer, "bpe": BPETokenizer}


def from_dict(data):
    if not isinstance(data, dict):
        raise ValueError(f"the tokenizer must be an object with a \"kind\", got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    return KINDS[kind].from_dict(data)


def fits(tokenizer, vocab_size):
    """Whether a model with vocab_size embedding rows can use the tokenizer: a character tokenizer
    numbers exactly the model's rows; a BPE one may leave rows unused (GPT-2 models padded to 50304)."""
    if tokenizer.kind == "char":
        return tokenizer.vocab_size == vocab_size
    return tokenizer.vocab_size <= vocab_size
