"""Token files made from a corpus in pieces, and made once: train.bin and val.bin, described by tokens.json.

The split: val.bin holds the tokens of the last 10% of the corpus's characters, train.bin those of
the first 90%, each part encoded on its own (for a character tokenizer that is exactly the first
90% of the tokens). Both are flat arrays of the smallest unsigned type that holds the vocabulary
(uint16 up to 65,536 tokens), as nanoGPT's are.

How memory stays bounded whatever the corpus's size: the corpus is read in pieces (minillm/corpus.py),
never whole. The first read (Corpus.scan) gives its digest, its number of characters (where the
split falls) and its characters (a character vocabulary). A BPE vocabulary is then learned on evenly
spaced pieces of the training split, read once more (tokenizers/choice.py says how much). The last
read encodes piece by piece and appends each piece's ids to the token files.
A BPE tokenizer may only be cut where no token could straddle the cut (safe_pieces), so the files
hold exactly the ids that encoding each part whole would give.

Made once: tokens.json records the corpus's digest, the tokenizer and the split. A later run into
the same out dir, on the same content with the same tokenizer, reuses the files (after one read
to compute the digest, far cheaper than tokenizing); any other content is tokenized anew.
"""

import contextlib
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy
import regex

from minillm import files, system, tokenizers
from minillm.checkpoint import UMASK, atomic_write
from minillm.data import open_token_file, token_dtype
from minillm.errors import DataError
from minillm.tokenizers.bpe import ENDOFTEXT, BPETokenizer
from minillm.tokenizers.char import CharTokenizer
from minillm.tokenizers.choice import BPE_SAMPLE_CHARACTERS, Recipe

TOKEN_FILES = ("train.bin", "val.bin")
DESCRIPTION_FILE = "tokens.json"
TOKENIZER_FILE = "tokenizer.json"
PREPARED_FILES = (*TOKEN_FILES, DESCRIPTION_FILE, TOKENIZER_FILE)
FORMAT = "minillm token files 1"
VAL_FRACTION = 0.1
PROGRESS_FROM_BYTES = 64 * files.MiB  # a bar for corpora that take more than a few seconds
# The last cut before a whitespace character that has a non-whitespace one on each side: GPT-2's
# pre-tokenisation starts a new chunk there however the text goes on (safe_pieces).
SAFE_CUT = regex.compile(r"(?r)\S\s\S")


@dataclass
class Prepared:
    """The token splits (memory maps of the files, or arrays), their tokenizer, and tokens.json's description."""

    train: numpy.ndarray
    val: numpy.ndarray
    tokenizer: object
    description: dict
    reused: bool = False
    bpe_sample: str = ""  # how much of the training split a BPE vocabulary made here was learned on

    def summary(self, directory):
        """Lines for the run's start: what the corpus holds and its split; the tokenizer; where the token files are."""
        corpus, tokenizer = self.description["corpus"], self.description["tokenizer"]
        documents = f" in {corpus['documents']:,} documents" if corpus["documents"] > 1 else ""
        tokens = len(self.train) + len(self.val)
        if directory is None:
            where = ""
        elif self.reused:
            where = f"\ntoken files: reused from {directory} (the same text and tokenizer)"
        else:
            where = f"\ntoken files: {', '.join(str(Path(directory) / name) for name in TOKEN_FILES)}, " \
                f"{numpy.dtype(self.train.dtype).name}"
        return (
            f"{corpus['characters']:,} characters ({size_text(corpus['bytes'])}){documents}: "
            f"{len(self.train):,} train tokens (the first 90% of the text), "
            f"{len(self.val):,} val tokens (the last 10%)\n"
            f"tokenizer: {tokenizer['name']}, {self.tokenizer.vocab_size:,} tokens, "
            f"{corpus['bytes'] / max(tokens, 1):.2f} bytes per token"
            + (f" (its vocabulary {self.bpe_sample})" if self.bpe_sample else "")
            + where
        )


def size_text(nbytes):
    return f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e6 else f"{nbytes:,} bytes"


def separator_for(choice):
    """What joins the documents: the tokenizer's "<|endoftext|>" when it has one, else a newline."""
    if isinstance(choice, Recipe):
        return choice.separator
    return ENDOFTEXT if choice.eot_id is not None else "\n"


def tokenizer_name(choice):
    if isinstance(choice, Recipe):
        return choice.kind
    return choice.kind if choice.kind == "char" else f"{choice.kind} (given)"


def prepare(corpus, choice, block_size, directory=None, show_progress=True):
    """The Prepared splits of `corpus` under `choice` (a tokenizer, or a Recipe to make one from the corpus).

    With a directory, the token files are written there (or reused: the module docstring); with
    None they are kept in memory (the ranks of a job other than rank 0, which leave the out dir
    to it). Each split must hold one window of block_size + 1 tokens (unless block_size is None).
    """
    separator = separator_for(choice)
    scan = corpus.scan(separator)
    cut = int(scan.characters * (1.0 - VAL_FRACTION))
    wanted = {
        "corpus": {"sha256": scan.digest, "separator": separator},
        "split": {"val_fraction": VAL_FRACTION, "val_starts_at_character": cut},
        "tokenizer": choice.to_dict() if isinstance(choice, Recipe) else {"sha256": tokenizer_digest(choice)},
    }
    if directory is not None:
        prepared = reusable(Path(directory), wanted, choice)
        if prepared is not None:
            return checked(prepared, corpus.name, block_size)
    bpe_sample = ""
    if isinstance(choice, Recipe):
        tokenizer, bpe_sample = make_tokenizer(choice, corpus, scan, separator, cut)
    else:
        tokenizer = choice
    description = {
        "format": FORMAT,
        "corpus": {"name": corpus.name, "sha256": scan.digest, "documents": corpus.documents(),
                   "characters": scan.characters, "bytes": scan.bytes, "separator": separator},
        "split": wanted["split"],
        "tokenizer": {"name": tokenizer_name(choice), "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "sha256": tokenizer_digest(tokenizer),
                      "recipe": choice.to_dict() if isinstance(choice, Recipe) else None},
    }
    bar = progress_bar(scan.bytes, show_progress and scan.bytes >= PROGRESS_FROM_BYTES)
    try:
        splits, counts = encode_splits(corpus, tokenizer, separator, scan, cut, directory, bar)
    finally:
        bar.close()
    for name, count in zip(TOKEN_FILES, counts):
        description[name] = {"tokens": count, "dtype": numpy.dtype(token_dtype(tokenizer.vocab_size)).name}
    if directory is not None:
        splits = publish(Path(directory), splits, tokenizer, description)
    return checked(Prepared(*splits, tokenizer, description, bpe_sample=bpe_sample), corpus.name, block_size)


def made_from(choice, corpus):
    """The tokenizer `choice` names, for a corpus held in memory (--sft's): a Recipe is made from all of it."""
    if not isinstance(choice, Recipe):
        return choice
    scan = corpus.scan(choice.separator)
    return make_tokenizer(choice, corpus, scan, choice.separator, scan.characters)[0]


def checked(prepared, name, block_size):
    if block_size is None:
        return prepared
    for split, tokens in (("train", prepared.train), ("val", prepared.val)):
        if len(tokens) < block_size + 1:
            raise DataError(
                f"{name}: the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use more text or a smaller --block-size"
            )
    return prepared


def tokenizer_digest(tokenizer):
    """SHA-256 of the tokenizer's JSON form: two tokenizers with the same digest encode alike."""
    text = json.dumps(tokenizer.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def reusable(directory, wanted, choice):
    """The Prepared files in directory when tokens.json says they hold `wanted` (corpus, split, tokenizer), else None.

    Files that do not match their description (a size that differs, a tokenizer file changed) are
    not reused either: they are tokenized anew.
    """
    try:
        description = json.loads((directory / DESCRIPTION_FILE).read_text(encoding="utf-8"))
        if description.get("format") != FORMAT:
            return None
        said = description["tokenizer"]
        same = (
            {key: description["corpus"].get(key) for key in wanted["corpus"]} == wanted["corpus"]
            and description["split"] == wanted["split"]
            and (said.get("recipe") == wanted["tokenizer"] if isinstance(choice, Recipe)
                 else said.get("sha256") == wanted["tokenizer"]["sha256"])
        )
        if not same:
            return None
        if isinstance(choice, Recipe):
            tokenizer = tokenizers.from_dict(json.loads((directory / TOKENIZER_FILE).read_text(encoding="utf-8")))
            if tokenizer_digest(tokenizer) != said["sha256"]:
                return None
        else:
            tokenizer = choice
        splits = []
        for name in TOKEN_FILES:
            path, dtype = directory / name, numpy.dtype(token_dtype(tokenizer.vocab_size))
            if dtype.name != description[name]["dtype"] or \
                    path.stat().st_size != description[name]["tokens"] * dtype.itemsize:
                return None
            splits.append(open_token_file(path, tokenizer.vocab_size))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no description, or one this version cannot read: the files are made anew
    return Prepared(*splits, tokenizer, description, reused=True)


def make_tokenizer(recipe, corpus, scan, separator, cut):
    """(the tokenizer a Recipe makes from the corpus, how much of it a BPE vocabulary was learned on)."""
    if recipe.kind == "char":
        return CharTokenizer([chr(codepoint) for codepoint in scan.codepoints]), ""
    every = max(1, math.ceil(cut / BPE_SAMPLE_CHARACTERS))
    sampled = [0]

    def sample():
        for number, piece in enumerate(safe_pieces(training_part(corpus.pieces(separator), cut), [ENDOFTEXT])):
            if number % every == 0:
                sampled[0] += len(piece)
                yield piece

    tokenizer = BPETokenizer.train_on_pieces(sample(), recipe.vocab_size)
    if tokenizer.vocab_size < recipe.vocab_size:
        raise DataError(
            f"--vocab-size {recipe.vocab_size}: the training text has pairs to merge for only "
            f"{tokenizer.vocab_size:,} tokens; give --vocab-size {tokenizer.vocab_size} or less, or more text"
        )
    whole = "all" if every == 1 else f"one piece in {every}, {sampled[0]:,} characters,"
    return tokenizer, f"learned on {whole} of the training split's {cut:,} characters"


def training_part(pieces, cut):
    """The pieces of the text's first `cut` characters."""
    for part, piece in split_at(pieces, cut):
        if part:
            return
        yield piece


def split_at(pieces, cut):
    """(0, piece) for the text before character `cut`, (1, piece) after it; a piece across the cut in two."""
    seen = 0
    for piece in pieces:
        if seen < cut < seen + len(piece):
            yield 0, piece[: cut - seen]
            yield 1, piece[cut - seen :]
        elif piece:
            yield (0 if seen + len(piece) <= cut else 1), piece
        seen += len(piece)


def safe_pieces(pieces, special_texts):
    """The same text in pieces cut only where byte-level BPE would start a new chunk anyway.

    GPT-2's pattern (tokenizers/bpe.py) starts a chunk at a whitespace character that has a
    non-whitespace character on each side (" world", "\nint"): nothing before it joins it, and
    what follows is read from it alike whether the text ends later or not. So encoding the
    pieces one by one gives the ids of the whole text. A special token must hold no whitespace
    (none of GPT-2's does), or it could straddle such a cut: then the text is one piece.
    """
    if any(char.isspace() for text in special_texts for char in text):
        yield "".join(pieces)
        return
    held, tail = [], ""  # text not yet given out (no cut found in it), and its last two characters
    for piece in pieces:
        window = tail + piece
        match = SAFE_CUT.search(window)
        if match is None:
            held.append(piece)
            tail = window[-2:]
            continue
        text = "".join(held) + piece
        cut = len(text) - len(window) + match.start() + 1
        yield text[:cut]
        held, tail = [text[cut:]], text[cut:][-2:]
    rest = "".join(held)
    if rest:
        yield rest


def encode_splits(corpus, tokenizer, separator, scan, cut, directory, bar):
    """([the two splits, encoded piece by piece: temporary files in directory, or arrays], [their token counts]).

    A file that changed since `scan` read it is an error: its tokens would not be those of the digest.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    encode = char_encoder(tokenizer, dtype) if tokenizer.kind == "char" else \
        (lambda text: numpy.asarray(tokenizer.encode(text), dtype=dtype))
    special = list(getattr(tokenizer, "special_tokens", ()))
    bytes_per_character = scan.bytes / max(scan.characters, 1)
    sinks = [TokenSink(directory, name) for name in TOKEN_FILES]
    digests = hashlib.sha256()
    try:
        for part, sided in itertools.groupby(split_at(corpus.pieces(separator, digests), cut), key=lambda s: s[0]):
            pieces = (piece for _, piece in sided)
            for piece in pieces if tokenizer.kind == "char" else safe_pieces(pieces, special):
                sinks[part].append(encode(piece))
                bar.update(round(len(piece) * bytes_per_character))
        if corpus.paths is not None and digests.hexdigest() != scan.digest:
            raise DataError(f"{corpus.name}: a file changed while it was being tokenized; run again once it is "
                            "written")
        return [sink.finish() for sink in sinks], [sink.tokens for sink in sinks]
    except BaseException:
        for sink in sinks:
            sink.discard()
        raise


def char_encoder(tokenizer, dtype):
    """A character tokenizer's encode as one table lookup per piece: its ids, or its own error for a new character."""
    codepoints = numpy.array([ord(char) for char in tokenizer.chars], dtype=numpy.int64)
    table = numpy.full(int(codepoints.max()) + 1, -1, dtype=numpy.int32)  # -1: not in the vocabulary
    table[codepoints] = numpy.arange(len(codepoints))

    def encode(text):
        points = numpy.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=numpy.uint32)
        ids = table[numpy.minimum(points, len(table) - 1)]
        if (points >= len(table)).any() or (ids < 0).any():
            tokenizer.encode(text)  # raises UnknownCharactersError naming the characters
        return ids.astype(dtype)

    return encode


class TokenSink:
    """Where one split's ids go: appended to a temporary file in directory, or kept as arrays (directory None).

    An OSError (a full disk) names the token file, as atomic_write's do: the temporary name means nothing."""

    def __init__(self, directory, name):
        self.arrays, self.file, self.path, self.tokens = [], None, None, 0
        if directory is not None:
            self.target = Path(directory) / name
            with self.naming_the_file():
                fd, self.path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            self.file = os.fdopen(fd, "wb")
            system.set_mode(fd, 0o666 & ~UMASK)  # mkstemp's file is private; token files are as any new file

    def append(self, ids):
        self.tokens += len(ids)
        if self.file is None:
            self.arrays.append(ids)
            return
        with self.naming_the_file():
            ids.tofile(self.file)

    def finish(self):
        """The split: the temporary file's path (flushed to disk), or the arrays joined."""
        if self.file is None:
            return numpy.concatenate(self.arrays) if self.arrays else numpy.zeros(0, dtype=numpy.uint16)
        with self.naming_the_file():
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        return self.path

    def discard(self):
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            Path(self.path).unlink(missing_ok=True)

    @contextlib.contextmanager
    def naming_the_file(self):
        try:
            yield
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(self.target)) from None


def publish(directory, temporary_paths, tokenizer, description):
    """Rename the finished token files into place, then write tokenizer.json and tokens.json; memory maps of both.

    tokens.json goes first and comes back last, so that at no moment does it describe files it does not.
    """
    (directory / DESCRIPTION_FILE).unlink(missing_ok=True)
    splits = []
    for name, path in zip(TOKEN_FILES, temporary_paths):
        os.replace(path, directory / name)
        splits.append(open_token_file(directory / name, tokenizer.vocab_size))
    write_json(directory / TOKENIZER_FILE, tokenizer.to_dict())
    write_json(directory / DESCRIPTION_FILE, description)
    return splits


def write_json(path, value):
    atomic_write(path, lambda f: f.write(json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8")))


def progress_bar(total_bytes, shown):
    """A tqdm bar on stderr (bytes, MB/s, time left) while a large corpus is tokenized; a silent one otherwise."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not shown,
                file=sys.stderr, mininterval=1.0)
