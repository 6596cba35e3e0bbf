"""A training corpus read as a stream of text pieces, never whole: so a corpus larger than memory can be tokenized.

A corpus is a list of documents: the files that --data names (a file, a folder's .txt files,
a glob pattern, or several of those), or one text already in memory (the built-in corpus,
--sft's examples). Read as one text, the documents are joined by a separator that the
tokenizer chooses ("<|endoftext|>" for a tokenizer that has it, else a newline).

`pieces()` yields that text in pieces of about PIECE_BYTES, each file decoded as UTF-8 on the
way (a byte that is not UTF-8 is an error naming the file and the byte's offset); `scan()`
reads it once for what preparing the token files needs to know first: a digest of the
content (to tell whether token files already made from it can be reused), the number of
characters (where the last 10% begins), and the set of characters (a character vocabulary).
"""

import codecs
import glob
import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy

from minillm import files
from minillm.errors import DataError

# Large enough that per-piece costs vanish, small enough that a piece's copies (its text, its code points,
# its ids) stay a few tens of MB.
PIECE_BYTES = files.MiB
EXPECTED = "a UTF-8 text file, a folder of .txt files, or a glob pattern (--data PATH ...)"


@dataclass
class Scan:
    """What one read of the whole corpus tells: see the module docstring."""

    digest: str  # SHA-256 over the documents' own SHA-256s in order, hex
    characters: int
    bytes: int
    codepoints: numpy.ndarray  # the sorted code points of the characters that occur, separators included


class Corpus:
    """Documents read as one text, in pieces (the module docstring)."""

    def __init__(self, name, paths=None, text=None, piece_bytes=PIECE_BYTES):
        self.name = name  # how messages name it: the --data value, or what the in-memory text is
        self.paths = paths  # the files, in order; None for a text in memory
        self.text = text
        self.piece_bytes = piece_bytes  # read this many bytes at a time (characters of a text in memory)

    @classmethod
    def from_text(cls, name, text, piece_bytes=PIECE_BYTES):
        if not text:
            raise DataError(f"{name}: the text is empty")
        return cls(name, text=text, piece_bytes=piece_bytes)

    @classmethod
    def from_paths(cls, sources, piece_bytes=PIECE_BYTES):
        """The corpus of --data's values: each a file, a folder (its .txt files by name), or a glob pattern."""
        sources = [sources] if isinstance(sources, str) else list(sources)
        paths = []
        for source in sources:
            paths.extend(documents_of(source))
        return cls(" ".join(sources), paths=paths, piece_bytes=piece_bytes)

    def documents(self):
        """How many documents the corpus joins."""
        return 1 if self.paths is None else len(self.paths)

    def pieces(self, separator, digests=None):
        """The corpus as text pieces (about piece_bytes each; cut anywhere, between any two characters).

        `digests` (a hashlib object), when given, sees the files' own SHA-256s as scan() does: once
        the pieces are all read, its digest is scan()'s unless a file changed in between.
        """
        if self.paths is None:
            step = self.piece_bytes
            for start in range(0, len(self.text), step):
                yield self.text[start : start + step]
            return
        for number, path in enumerate(self.paths):
            if number:
                yield separator
            own = Digest()
            yield from file_pieces(path, self.piece_bytes, own)
            if digests is not None:
                digests.update(own.sha256.digest())

    def scan(self, separator):
        """One read of the whole corpus: its Scan (digest, characters, bytes, code points)."""
        digests, characters, size = hashlib.sha256(), 0, 0
        seen = numpy.zeros(0, dtype=bool)
        documents = [self.text] if self.paths is None else self.paths
        for number, document in enumerate(documents):
            own = Digest()
            if self.paths is None:
                own.update(document.encode("utf-8", errors="surrogatepass"))
                texts = [document]
            else:
                texts = file_pieces(document, self.piece_bytes, own)
            if number:
                size += len(separator.encode("utf-8"))
                texts = itertools.chain([separator], texts)  # a file's pieces stay a stream, never a list
            for text in texts:
                characters += len(text)
                seen = mark_codepoints(seen, text)
            digests.update(own.sha256.digest())
            size += own.bytes
        return Scan(digests.hexdigest(), characters, size, numpy.flatnonzero(seen))


class Digest:
    """A SHA-256 that also counts the bytes it saw."""

    def __init__(self):
        self.sha256, self.bytes = hashlib.sha256(), 0

    def update(self, raw):
        self.sha256.update(raw)
        self.bytes += len(raw)


def documents_of(source):
    """The files one --data value names, in order: the file, a folder's .txt files, or a glob pattern's matches."""
    path = Path(source)
    if path.is_dir():
        found = sorted(path.glob("*.txt"))
        if not found:
            raise DataError(f"{source}: the folder has no .txt files; "
                            "point --data at a text file or a folder of .txt files")
        return found
    if not os.path.lexists(source) and glob.has_magic(source):
        found = sorted(Path(match) for match in glob.glob(source, recursive=True) if not os.path.isdir(match))
        if not found:
            raise DataError(f"{source}: the pattern matches no file; check it, or quote it so that the shell "
                            "leaves it to train.py")
        return found
    return [path]


def file_pieces(path, piece_bytes, digest):
    """The text of one file in pieces, decoded as UTF-8 (a bad byte named with its offset); digest sees its bytes.

    An empty file is an error: as a document of a folder or pattern it is nearly always a mistake.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with files.open_regular(path, DataError, EXPECTED) as f:
        while True:
            try:
                raw = f.read(piece_bytes)
            except OSError as err:
                raise DataError(f"{path}: cannot read it ({files.describe_oserror(err)})") from None
            digest.update(raw)
            decoding = decoder.getstate()[0] + raw  # what decode() sees: a character the last read cut, then raw
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                where = offset + len(raw) - len(decoding) + err.start
                raise DataError(f"{path}: not UTF-8 text (byte {where:,} is {decoding[err.start]:#04x}); "
                                "convert it to UTF-8 or choose another file") from None
            if not raw:
                if not offset:
                    raise DataError(f"{path}: the file is empty; remove it from the corpus or give it text")
                return
            offset += len(raw)
            if text:
                yield text


def mark_codepoints(seen, text):
    """`seen` (a bool per code point) with the code points of text marked, grown as needed."""
    if not text:
        return seen
    codepoints = numpy.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=numpy.uint32)
    present = numpy.bincount(codepoints) > 0
    if len(present) > len(seen):
        seen = numpy.concatenate([seen, numpy.zeros(len(present) - len(seen), dtype=bool)])
    seen[: len(present)] |= present
    return seen
