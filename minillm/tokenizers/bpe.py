"""Byte-level BPE (byte-pair encoding), GPT-2's tokenizer: train one here, or load GPT-2's files.

Text becomes ids in three steps.

1. Special tokens. Strings such as "<|endoftext|>" are cut out of the text
   first and become one id each; the text between them goes through 2 and 3.
2. Pre-tokenisation. GPT-2's regular expression cuts the text into chunks:
   the contractions 's 't 're 've 'm 'll 'd, runs of letters, of digits, or of
   other symbols, each with at most one space in front (" world", " 42", " ("),
   and runs of whitespace. Merges never cross a chunk boundary, so " dog" is
   the same tokens wherever it appears, and "dog." can never become one token.
3. Merges. A chunk starts as its UTF-8 bytes, one token per byte, so every
   text can be encoded and there is no "unknown" token. A merge is a pair of
   tokens learned in training, ("t", "h") -> "th"; its rank is its place in the
   list of merges. While some adjacent pair of the chunk has a merge, the pair
   whose merge has the lowest rank (was learned first) is replaced by the
   merged token, wherever it occurs in the chunk.

Decoding joins the tokens' bytes and decodes them as UTF-8. Ids cut in the
middle of a character give bytes that are not valid UTF-8; those become U+FFFD.

Training (BPETokenizer.train, with the algorithm in bpe_train.py) learns the
merges from a corpus. Files are GPT-2's own: vocab.json ({token: id}) and
merges.txt (a "#version: 0.2" line, then one "left right" merge per line in
rank order), with each token's bytes written through GPT-2's byte-to-character
map (bytes_to_unicode).
"""

import json
import math
import warnings
from collections import Counter
from pathlib import Path

import regex

from minillm import files
from minillm.tokenizers.bpe_train import learn_merges, merge_pair

# GPT-2's pre-tokenisation pattern; \p{L} is any Unicode letter, \p{N} any digit or numeral.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"
TOKENIZER_FILE_LIMIT = 64 * files.MiB  # GPT-2's vocab.json is 1 MiB, its merges.txt 0.5 MiB
CACHE_LIMIT = 100_000  # chunks whose ids encode() remembers; the cache is emptied when it is full


class TokenizerError(ValueError):
    """Tokenizer files or data that cannot be used, or ids outside the vocabulary."""


def pretokenize(text):
    """GPT-2's chunks of `text` (step 2 of the module docstring); joined, they give back the text."""
    return GPT2_PATTERN.findall(text)


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to 256 printable characters, none of them whitespace.

    vocab.json and merges.txt are text, and merges.txt separates the halves of
    a merge with a space, so a token is written one character per byte, using
    characters that are visible and never a space. The bytes that are such
    characters already (! to ~, ¡ to ¬, ® to ÿ) stand for themselves; the other
    68 (control characters, space, DEL, no-break space, soft hyphen, ...) take
    chr(256), chr(257), ... in byte order. A space is written "Ġ" (chr(256 + 32)),
    a newline "Ċ" (chr(256 + 10)).
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in visible}
    others = [b for b in range(256) if b not in mapping]
    for n, b in enumerate(others):
        mapping[b] = chr(256 + n)
    return mapping


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {char: b for b, char in BYTE_TO_CHAR.items()}


def token_to_text(token):
    """A token's bytes as written in vocab.json and merges.txt: b" the" -> "Ġthe"."""
    return "".join(BYTE_TO_CHAR[b] for b in token)


def text_to_token(text):
    """The bytes a vocab.json or merges.txt entry stands for, or None if it is not written in GPT-2's alphabet."""
    if not text or any(char not in CHAR_TO_BYTE for char in text):
        return None
    return bytes(CHAR_TO_BYTE[char] for char in text)


class BPETokenizer:
    """A byte-level BPE tokenizer.

        tokenizer = BPETokenizer.train(text, vocab_size=1024)   # or BPETokenizer.load("path/to/gpt2")
        ids = tokenizer.encode("Hello world")                    # [15496, 995] with GPT-2's files
        text = tokenizer.decode(ids)
        tokenizer.save("out/tokenizer")                          # vocab.json and merges.txt

    vocab: {token bytes: id}, including all 256 single bytes; merges: [(left
    bytes, right bytes)] in rank order, each half and their join in vocab;
    special_tokens: {text: id}. The ids of vocab and special_tokens together are
    0..N-1, each used once.
    """

    kind = "bpe"

    def __init__(self, vocab, merges, special_tokens=None):
        self.vocab = dict(vocab)
        self.merges = [tuple(merge) for merge in merges]
        self.special_tokens = dict(special_tokens or {})
        check_ids(self.vocab, self.special_tokens)

        # id -> bytes, for decode(); a special token decodes to its text.
        self.token_bytes = [b""] * (len(self.vocab) + len(self.special_tokens))
        for token, i in self.vocab.items():
            self.token_bytes[i] = token
        for text, i in self.special_tokens.items():
            if not text:
                raise TokenizerError("a special token cannot be the empty string")
            self.token_bytes[i] = text.encode("utf-8")

        missing = [b for b in range(256) if bytes([b]) not in self.vocab]
        if missing:
            raise TokenizerError(
                f"the vocabulary lacks {len(missing)} of the 256 byte tokens, e.g. byte {missing[0]:#04x} "
                f"({BYTE_TO_CHAR[missing[0]]!r}); a byte-level vocabulary has every byte"
            )
        self.byte_ids = [self.vocab[bytes([b])] for b in range(256)]

        # (left id, right id) -> rank and -> id of the merged token.
        self.merge_rank, self.merge_result = {}, {}
        for rank, (left, right) in enumerate(self.merges):
            for token in (left, right, left + right):
                if token not in self.vocab:
                    raise TokenizerError(
                        f"the merge of rank {rank} ({token_to_text(left)} {token_to_text(right)}): "
                        f"the token {token_to_text(token)!r} is not in the vocabulary"
                    )
            pair = (self.vocab[left], self.vocab[right])
            if pair not in self.merge_rank:  # a repeated merge keeps its first (lowest) rank
                self.merge_rank[pair] = rank
                self.merge_result[pair] = self.vocab[left + right]

        self._special_pattern = special_pattern(self.special_tokens)
        self._cache = {}  # chunk -> its ids: text repeats its chunks a lot (" the", " of", ...)

    # -- the shared tokenizer interface --------------------------------------------------------

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    @property
    def eot_id(self):
        """The id of "<|endoftext|>", which separates documents, or None without it."""
        return self.special_tokens.get(ENDOFTEXT)

    def encode(self, text, allow_special=True):
        """Token ids of `text`.

        With allow_special (the default, as in Hugging Face's GPT-2 tokenizer) the
        text of a special token, "<|endoftext|>", becomes its one id, so a corpus
        whose documents are separated by it is encoded as meant. With
        allow_special=False it is encoded as ordinary text (several tokens): use
        that for text from users, who should not be able to end a document.
        """
        ids = []
        start = 0
        if allow_special and self._special_pattern is not None:
            for match in self._special_pattern.finditer(text):
                self._encode_ordinary(text[start : match.start()], ids)
                ids.append(self.special_tokens[match.group()])
                start = match.end()
        self._encode_ordinary(text[start:], ids)
        return ids

    def decode(self, ids):
        """The text of `ids`; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        pieces = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
            pieces.append(self.token_bytes[i])
        return b"".join(pieces).decode("utf-8", errors="replace")

    def to_dict(self):
        """JSON-ready: what vocab.json and merges.txt hold, and which tokens are special."""
        vocab_table = {token_to_text(token): i for token, i in self.vocab.items()} | self.special_tokens
        return {
            "kind": self.kind,
            "vocab": dict(sorted(vocab_table.items(), key=lambda item: item[1])),
            "merges": [f"{token_to_text(left)} {token_to_text(right)}" for left, right in self.merges],
            "special_tokens": list(self.special_tokens),
        }

    @classmethod
    def from_dict(cls, data):
        try:
            vocab_table, merge_lines, special_texts = data["vocab"], data["merges"], data["special_tokens"]
        except KeyError as err:
            raise TokenizerError(f"BPE tokenizer data lacks the key {err.args[0]!r}") from None
        if not isinstance(merge_lines, list):
            raise TokenizerError("BPE tokenizer data: 'merges' must be a list of \"left right\" strings")
        if not isinstance(special_texts, list) or not all(isinstance(text, str) for text in special_texts):
            raise TokenizerError("BPE tokenizer data: 'special_tokens' must be a list of strings")
        merges = parse_merges(merge_lines, "BPE tokenizer data")
        vocab, special_tokens = parse_vocab(vocab_table, merges, "BPE tokenizer data")
        if set(special_tokens) != set(special_texts):
            raise TokenizerError(
                f"BPE tokenizer data: the vocab entries that are neither bytes nor merge results, "
                f"{sorted(special_tokens)}, differ from the special tokens {special_texts!r}"
            )
        return cls(vocab, merges, special_tokens)

    # -- encoding -------------------------------------------------------------------------------

    def _encode_ordinary(self, text, ids):
        """Append the ids of `text`, which holds no special token, to `ids`."""
        for chunk in pretokenize(text):
            chunk_ids = self._cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._merge_chunk(chunk)
                if len(self._cache) >= CACHE_LIMIT:
                    self._cache.clear()
                self._cache[chunk] = chunk_ids
            ids.extend(chunk_ids)

    def _merge_chunk(self, chunk):
        """The ids of one chunk: its bytes, then the merges by rank (step 3 of the module docstring)."""
        try:
            data = chunk.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TokenizerError(
                f"the text contains {chunk[err.start]!r}, a lone surrogate, which UTF-8 cannot encode"
            ) from None
        ids = [self.byte_ids[b] for b in data]
        while len(ids) > 1:
            best = min(zip(ids, ids[1:]), key=lambda pair: self.merge_rank.get(pair, math.inf))
            if best not in self.merge_rank:
                break  # no adjacent pair has a merge
            ids = merge_pair(ids, best, self.merge_result[best])
        return tuple(ids)

    # -- training -------------------------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, special_tokens=(ENDOFTEXT,)):
        """Learn merges from `text` until the vocabulary has `vocab_size` tokens.

        The vocabulary is the 256 byte tokens (ids 0..255), then the merged
        tokens in the order learned, then the special tokens. Special tokens in
        the text are cut out before counting, so no merge spans one. If the text
        runs out of pairs to merge, the vocabulary ends up smaller, with a warning
        that gives the size reached.
        """
        tokenizer = cls.train_on_pieces([text], vocab_size, special_tokens)
        if tokenizer.vocab_size < vocab_size:
            warnings.warn(
                f"BPE training reached {tokenizer.vocab_size} tokens, not the {vocab_size} asked for: the text has "
                f"no more pairs to merge after {len(tokenizer.merges)} merges; train on more text for a larger "
                "vocabulary",
                stacklevel=2,
            )
        return tokenizer

    @classmethod
    def train_on_pieces(cls, pieces, vocab_size, special_tokens=(ENDOFTEXT,)):
        """train() on a text given as pieces, each counted as it comes (a corpus larger than memory).

        The pieces must be cut where no chunk of step 2 straddles a cut (minillm/data.py's
        safe_pieces); the vocabulary may end up smaller than asked, without a warning.
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        n_new_tokens = vocab_size - 256 - len(special_tokens)
        if n_new_tokens < 0:
            raise TokenizerError(
                f"vocab_size {vocab_size} is too small: a byte-level BPE vocabulary has the 256 bytes "
                f"and {len(special_tokens)} special token(s), so at least {256 + len(special_tokens)}"
            )
        pattern = special_pattern(special_tokens)
        chunk_counts = Counter()
        for text in pieces:
            for piece in pattern.split(text) if pattern else [text]:
                chunk_counts.update(pretokenize(piece))
        word_counts = Counter()
        for chunk, count in chunk_counts.items():
            try:
                word_counts[chunk.encode("utf-8")] += count
            except UnicodeEncodeError:
                raise TokenizerError(f"the training text contains a lone surrogate in {chunk!r}") from None
        vocab, merges = learn_merges(word_counts, n_new_tokens)
        return cls(vocab, merges, {token: len(vocab) + i for i, token in enumerate(special_tokens)})

    # -- GPT-2's files --------------------------------------------------------------------------

    def save(self, directory):
        """Write vocab.json and merges.txt, GPT-2's format, into `directory`; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = self.to_dict()  # its vocab lists the special tokens too, as GPT-2's vocab.json does
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        vocab_path.write_text(json.dumps(table["vocab"], ensure_ascii=False), encoding="utf-8")
        # Readers drop the text after the last newline, so the file must end with one.
        merges_path.write_text("\n".join([MERGES_HEADER, *table["merges"]]) + "\n", encoding="utf-8")
        return vocab_path, merges_path

    @classmethod
    def load(cls, directory):
        """The tokenizer in `directory`/vocab.json and `directory`/merges.txt."""
        directory = Path(directory)
        return cls.from_files(directory / "vocab.json", directory / "merges.txt")

    @classmethod
    def from_files(cls, vocab_path, merges_path):
        """A tokenizer from GPT-2's two files (the original release names them encoder.json and vocab.bpe).

        Entries of vocab.json that are neither a byte nor the result of a merge
        are special tokens, as GPT-2's "<|endoftext|>" is.
        """
        vocab_table = files.parse_json(read_text(vocab_path, "vocab.json"), vocab_path, TokenizerError)
        # lines_of drops the "\r" of Windows line endings; no token is written with one (bytes_to_unicode).
        lines = files.lines_of(read_text(merges_path, "merges.txt"))
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = parse_merges([line for line in lines if line], merges_path)
        vocab, special_tokens = parse_vocab(vocab_table, merges, vocab_path)
        unmade = sorted((i, text) for text, i in special_tokens.items() if not written_as_special(text))
        if unmade:
            i, text = unmade[0]
            raise TokenizerError(
                f"{merges_path}: no merge makes {len(unmade)} token(s) of {vocab_path}, the first {text!r} (id {i}); "
                "merges.txt is missing merges (cut short?): use the merges.txt that belongs to this vocab.json "
                "(only special tokens, written <...> or [...], may be made by no merge)"
            )
        try:
            return cls(vocab, merges, special_tokens)
        except TokenizerError as err:
            raise TokenizerError(f"{vocab_path}, {merges_path}: {err}") from None


def special_pattern(special_tokens):
    """A regular expression matching any of the special tokens (longest first, so that a token
    that begins with another one wins), or None when there are none."""
    if not special_tokens:
        return None
    return regex.compile("|".join(regex.escape(text) for text in sorted(special_tokens, key=len, reverse=True)))


def written_as_special(text):
    """Whether a vocab.json entry is written as special tokens are: <|endoftext|>, <pad>, [CLS]."""
    return len(text) > 2 and (text[0], text[-1]) in (("<", ">"), ("[", "]"))


def read_text(path, kind):
    return files.read_small_text(path, TokenizerError, TOKENIZER_FILE_LIMIT, f"a GPT-2 tokenizer's {kind}")


def parse_merges(lines, where):
    """[(left bytes, right bytes)] from merges.txt lines "left right" (without the #version line)."""
    merges = []
    for number, line in enumerate(lines, start=1):
        halves = line.split(" ") if isinstance(line, str) else []
        tokens = [text_to_token(half) for half in halves]
        if len(tokens) != 2 or None in tokens:
            raise TokenizerError(
                f"{where}: merge {number} is {line!r}; expected two tokens in GPT-2's byte alphabet, "
                "separated by one space"
            )
        merges.append(tuple(tokens))
    return merges


def parse_vocab(table, merges, where):
    """Split a vocab.json table into ({token bytes: id} of bytes and merge results, {other text: id})."""
    if not isinstance(table, dict):
        raise TokenizerError(f"{where}: expected a JSON object {{token: id}}, got {type(table).__name__}")
    reachable = {bytes([b]) for b in range(256)} | {left + right for left, right in merges}
    vocab, leftovers = {}, {}
    for text, i in table.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise TokenizerError(f"{where}: the id of {text!r} is {i!r}, not an integer")
        token = text_to_token(text)
        if token in reachable:
            vocab[token] = i
        else:
            leftovers[text] = i
    return vocab, leftovers


def check_ids(vocab, special_tokens):
    """The ids must be 0..N-1, each used once: ids index the model's embedding rows."""
    ids = [*vocab.values(), *special_tokens.values()]
    if sorted(ids) != list(range(len(ids))):
        repeated = [i for i, count in Counter(ids).items() if count > 1]
        missing = sorted(set(range(len(ids))) - set(ids))
        problem = f"id {repeated[0]} is used twice" if repeated else f"id {missing[0]} is missing"
        raise TokenizerError(f"token ids must be 0..{len(ids) - 1}, each used once, but {problem}")
