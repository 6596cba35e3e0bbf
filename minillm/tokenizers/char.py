"""Character-level tokenizer: one id per distinct character of the training text."""


# A "\r" the vocabulary lacks is nearly always a file saved on Windows: say so, and how to convert it.
CRLF_HINT = (
    "; '\\r' ends each line of a file saved with Windows line endings (CRLF): save it with LF line endings, e.g. "
    "python -c \"import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
    "p.write_bytes(p.read_bytes().replace(b'\\r\\n', b'\\n'))\" FILE"
)


class UnknownCharactersError(ValueError):
    """Text contains characters the vocabulary does not have."""


class CharTokenizer:
    kind = "char"
    eot_id = None  # no end-of-text token: documents are not separated

    def __init__(self, chars):
        self.chars = list(chars)
        self.ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        """The vocabulary is the sorted set of characters in `text`."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return [self.ids[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self.ids.keys())
            shown = ", ".join(repr(c) for c in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            hint = CRLF_HINT if "\r" in unknown else ""
            raise UnknownCharactersError(
                f"text has {len(unknown)} character(s) not in the {self.vocab_size}-character "
                f"vocabulary: {shown}{more}{hint}"
            ) from None

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self):
        return {"kind": self.kind, "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data):
        chars = data.get("chars")
        if not isinstance(chars, str) or not chars or len(set(chars)) < len(chars):
            raise ValueError("a character tokenizer's \"chars\" must be a string of distinct characters")
        return cls(chars)
