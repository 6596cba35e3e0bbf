"""Token files made from a corpus in pieces (minillm/prepare.py, minillm/corpus.py): exactly the ids of encoding
each split whole, in memory bounded by a piece rather than the text, reused only for the same text and tokenizer,
and a one-line error naming the file and byte for a corpus that cannot be read."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from minillm import data, prepare, system
from minillm.corpus import Corpus
from minillm.errors import DataError
from minillm.tokenizers.bpe import ENDOFTEXT, BPETokenizer
from minillm.tokenizers.char import CharTokenizer
from minillm.tokenizers.choice import Recipe

ROOT = Path(__file__).resolve().parent.parent
across_examples = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bpe():
    """A small BPE vocabulary with <|endoftext|>, learned on text with many kinds of whitespace and characters."""
    return BPETokenizer.train(data.builtin_corpus()[:30_000] + " naïve café ☕ 日本語\t\tx\r\n\n y" * 20, 400)


# Texts that put GPT-2's whitespace rules, multi-byte characters and <|endoftext|> near every cut.
PARTS = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "a", "word", " the", "'s", "42", "!?", "é", "日本", "☕",
         "\U0001f600", ENDOFTEXT, " " + ENDOFTEXT + " "]
texts = st.lists(st.sampled_from(PARTS), min_size=1, max_size=60).map("".join)


def whole_encoding(tokenizer, text):
    """What the files must hold: the first 90% of the characters and the last 10%, each encoded whole."""
    cut = int(len(text) * (1 - prepare.VAL_FRACTION))
    return tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:])


@across_examples
@given(text=texts, piece=st.integers(1, 40))
def test_bpe_pieces_give_the_ids_of_the_whole_text(bpe, text, piece):
    prepared = prepare.prepare(Corpus.from_text("t", text, piece_bytes=piece), bpe, block_size=None)
    train, val = whole_encoding(bpe, text)
    assert prepared.train.tolist() == train and prepared.val.tolist() == val


@across_examples
@given(text=texts, piece=st.integers(1, 40))
def test_character_pieces_give_the_ids_of_the_whole_text(text, piece):
    prepared = prepare.prepare(Corpus.from_text("t", text, piece_bytes=piece), Recipe("char"), block_size=None)
    tokenizer = CharTokenizer.from_text(text)
    assert prepared.tokenizer.chars == tokenizer.chars
    assert (prepared.train.tolist(), prepared.val.tolist()) == whole_encoding(tokenizer, text)


@across_examples
@given(documents=st.lists(texts, min_size=1, max_size=4), piece=st.integers(1, 64),
       kind=st.sampled_from(["char", "bpe"]))
def test_files_read_in_pieces_of_bytes_give_the_ids_of_the_joined_text(tmp_path, bpe, documents, piece, kind):
    """Files are read a few bytes at a time, so reads cut multi-byte characters too; the documents are
    joined by <|endoftext|> for a BPE tokenizer, by a newline for characters."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    for number, text in enumerate(documents):
        (folder / f"{number:02d}.txt").write_bytes(text.encode("utf-8"))
    choice = bpe if kind == "bpe" else Recipe("char")
    prepared = prepare.prepare(Corpus.from_paths(str(folder), piece_bytes=piece), choice, block_size=None)
    joined = (ENDOFTEXT if kind == "bpe" else "\n").join(documents)
    tokenizer = bpe if kind == "bpe" else CharTokenizer.from_text(joined)
    assert (prepared.train.tolist(), prepared.val.tolist()) == whole_encoding(tokenizer, joined)


@settings(max_examples=200, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_safe_pieces_keep_the_text_and_cut_only_where_encoding_is_unchanged(bpe, text, cuts):
    points = sorted({min(cut, len(text)) for cut in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(points, points[1:])]
    safe = list(prepare.safe_pieces(pieces, bpe.special_tokens))
    assert "".join(safe) == text and all(safe)
    assert [i for piece in safe for i in bpe.encode(piece)] == bpe.encode(text)


def test_a_bpe_vocabulary_is_learned_on_the_training_split_and_saved_beside_the_files(tmp_path):
    text = data.builtin_corpus()[:60_000]
    prepared = prepare.prepare(Corpus.from_text("t", text), Recipe("bpe", 300), block_size=8, directory=tmp_path)
    cut = int(len(text) * 0.9)
    assert prepared.tokenizer.to_dict() == BPETokenizer.train(text[:cut], 300).to_dict()
    assert prepared.bpe_sample == f"learned on all of the training split's {cut:,} characters"
    saved = json.loads((tmp_path / prepare.TOKENIZER_FILE).read_text(encoding="utf-8"))
    assert saved == prepared.tokenizer.to_dict()
    assert numpy.fromfile(tmp_path / "train.bin", dtype=numpy.uint16).tolist() == prepared.tokenizer.encode(text[:cut])


def test_a_large_training_split_teaches_bpe_on_evenly_spaced_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BPE_SAMPLE_CHARACTERS", 20_000)
    text = data.builtin_corpus()[:100_000]
    prepared = prepare.prepare(Corpus.from_text("t", text, piece_bytes=5_000), Recipe("bpe", 300), block_size=8)
    assert prepared.bpe_sample.startswith("learned on one piece in 5, ")  # 90,000 characters: 5 of 18 pieces
    sampled = int(prepared.bpe_sample.split("in 5, ")[1].split(" ")[0].replace(",", ""))
    assert 15_000 <= sampled <= 25_000


def test_the_smallest_token_type_that_holds_the_vocabulary(tmp_path):
    text = "".join(map(chr, range(0x20000, 0x20000 + 70_000))) * 2  # 70,000 characters: beyond uint16
    prepared = prepare.prepare(Corpus.from_text("t", text), Recipe("char"), block_size=8, directory=tmp_path)
    assert prepared.train.dtype == numpy.uint32 and prepared.description["train.bin"]["dtype"] == "uint32"
    assert prepared.train[-1] == prepared.tokenizer.ids[text[len(prepared.train) - 1]]


# -- made once ---------------------------------------------------------------------------------------------


def corpus_file(tmp_path, text):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_same_text_and_tokenizer_are_reused_and_anything_else_is_tokenized_anew(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    text = data.builtin_corpus()[:20_000]
    path = corpus_file(tmp_path, text)
    first = prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, out)
    assert not first.reused
    again = prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, out)
    assert again.reused and again.train.tolist() == first.train.tolist()
    assert again.tokenizer.chars == first.tokenizer.chars

    # One byte changed, the size and modification time kept: the digest, not the file's stat, decides.
    stat = path.stat()
    changed = text[:100] + ("X" if text[100] != "X" else "Y") + text[101:]
    path.write_text(changed, encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    redone = prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, out)
    assert not redone.reused
    assert redone.train.tolist() == redone.tokenizer.encode(changed[: int(len(changed) * 0.9)])

    other = prepare.prepare(Corpus.from_paths(str(path)), Recipe("bpe", 300), 8, out)
    assert not other.reused and other.tokenizer.kind == "bpe"
    assert not prepare.prepare(Corpus.from_paths(str(path)), Recipe("bpe", 301), 8, out).reused
    given = BPETokenizer.train(text, 280)
    assert not prepare.prepare(Corpus.from_paths(str(path)), given, 8, out).reused
    assert prepare.prepare(Corpus.from_paths(str(path)), given, 8, out).reused


def test_token_files_that_differ_from_their_description_are_made_anew(tmp_path):
    path = corpus_file(tmp_path, data.builtin_corpus()[:20_000])
    prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, tmp_path)
    with open(tmp_path / "val.bin", "ab") as f:
        f.write(b"\0\0")
    redone = prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, tmp_path)
    assert not redone.reused and (tmp_path / "val.bin").stat().st_size == 2 * len(redone.val)
    (tmp_path / prepare.TOKENIZER_FILE).write_text(json.dumps({"kind": "char", "chars": "ab"}), encoding="utf-8")
    assert not prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, tmp_path).reused
    (tmp_path / prepare.DESCRIPTION_FILE).write_text("{not json", encoding="utf-8")
    assert not prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, tmp_path).reused


def test_an_interrupted_preparation_leaves_the_earlier_files_and_no_temporary_ones(tmp_path, monkeypatch):
    path = corpus_file(tmp_path, data.builtin_corpus()[:20_000])
    prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in prepare.PREPARED_FILES}
    path.write_text(data.builtin_corpus()[20_000:60_000], encoding="utf-8")
    appended = []

    def ctrl_c_on_the_second_piece(self, ids):
        appended.append(len(ids))
        if len(appended) == 2:
            raise KeyboardInterrupt
        self.file.write(ids.tobytes())

    monkeypatch.setattr(prepare.TokenSink, "append", ctrl_c_on_the_second_piece)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(Corpus.from_paths(str(path), piece_bytes=1000), Recipe("char"), 8, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([*prepare.PREPARED_FILES, "corpus.txt"])
    assert {name: (tmp_path / name).read_bytes() for name in prepare.PREPARED_FILES} == before


def test_a_file_that_changes_between_the_two_reads_is_an_error_not_files_of_mixed_text(tmp_path, monkeypatch):
    path = corpus_file(tmp_path, data.builtin_corpus()[:20_000])
    scan = Corpus.scan

    def scan_then_edit(self, separator):
        found = scan(self, separator)
        path.write_text(data.builtin_corpus()[1:20_001], encoding="utf-8")  # the same size, other text
        return found

    monkeypatch.setattr(Corpus, "scan", scan_then_edit)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"corpus\.txt: a file changed while it was being tokenized; run again"):
        prepare.prepare(Corpus.from_paths(str(path)), Recipe("char"), 8, out)
    assert os.listdir(out) == []


# -- the corpus as --data names it --------------------------------------------------------------------------


def test_data_takes_files_folders_and_glob_patterns_in_order(tmp_path):
    for name, text in (("b.txt", "bee"), ("a.txt", "ay"), ("c.md", "see")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert Corpus.from_paths(str(tmp_path)).paths == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert Corpus.from_paths(str(tmp_path / "*.md")).paths == [tmp_path / "c.md"]
    several = Corpus.from_paths([str(tmp_path / "c.md"), str(tmp_path / "[ab].txt")])
    assert several.paths == [tmp_path / "c.md", tmp_path / "a.txt", tmp_path / "b.txt"]
    assert "".join(several.pieces("|")) == "see|ay|bee"
    with pytest.raises(DataError, match=r"nothing\*\.txt: the pattern matches no file"):
        Corpus.from_paths(str(tmp_path / "nothing*.txt"))


def test_an_empty_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"b\.txt: the file is empty"):
        Corpus.from_paths(str(tmp_path)).scan("\n")


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_a_byte_that_is_not_utf8_is_named_with_its_file_and_offset(tmp_path, piece):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("héllo wörld".encode("utf-8") + b"\xff tail")
    with pytest.raises(DataError, match=r"b\.txt: not UTF-8 text \(byte 13 is 0xff\)") as err:
        Corpus.from_paths(str(tmp_path), piece_bytes=piece).scan("\n")
    assert "\n" not in str(err.value)
    (tmp_path / "b.txt").write_bytes("ends inside a character: é".encode("utf-8")[:-1])
    with pytest.raises(DataError, match=r"b\.txt: not UTF-8 text \(byte 25 is 0xc3\)"):
        Corpus.from_paths(str(tmp_path), piece_bytes=piece).scan("\n")


def test_a_vocabulary_larger_than_the_text_supports_is_one_line():
    with pytest.raises(DataError, match=r"--vocab-size 5000: the training text has pairs to merge for only [\d,]+ "
                                        r"tokens; give --vocab-size \d+ or less") as err:
        prepare.prepare(Corpus.from_text("t", "abc abd " * 200), Recipe("bpe", 5000), block_size=8)
    assert "\n" not in str(err.value)


# -- memory ---------------------------------------------------------------------------------------------------

MEASURE = """
import sys
from minillm import prepare, system
from minillm.corpus import Corpus
from minillm.tokenizers.choice import Recipe
small, large, out, kind = sys.argv[1:]
peaks = []
for path in (small, large):
    prepare.prepare(Corpus.from_paths(path), Recipe(kind, 300), 8, out)
    peaks.append(system.resident_memory()[1])
print(peaks[1] - peaks[0])
"""


def repeated_corpus(folder, megabytes):
    """A folder of two documents, a short one and one of about `megabytes` MB: the second is read after the
    separator, as every document but the first of a --data folder is. Returns their size in bytes."""
    text = data.builtin_corpus()
    folder.mkdir()
    (folder / "a.txt").write_text(text[:1000], encoding="utf-8")
    with open(folder / "b.txt", "w", encoding="utf-8") as f:
        for _ in range(megabytes * 10**6 // len(text) + 1):
            f.write(text)
    return sum(path.stat().st_size for path in folder.iterdir())


@pytest.mark.skipif(system.resident_memory()[1] is None, reason="this system does not report peak memory")
# BPE's extra text is the larger: its peak moves by up to about 10 MB from one process to the next whatever the
# text's size (4, 2 and 10 MB for 20, 40 and 60 MB more text, in one environment), as the allocator places things.
@pytest.mark.parametrize("kind, megabytes", [("char", (8, 40)), ("bpe", (4, 64))])
def test_peak_memory_does_not_grow_with_the_text(tmp_path, kind, megabytes):
    """Preparing a text several times larger raises the peak resident memory by far less than the extra text
    (a bound, not a timing): a change that holds the whole text, or its ids, in memory fails here."""
    small, large = tmp_path / "small", tmp_path / "large"
    extra = repeated_corpus(large, megabytes[1]) - repeated_corpus(small, megabytes[0])
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", MEASURE, str(small), str(large), str(out), kind],
                            capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    growth = int(result.stdout)
    assert growth < extra / 3, f"the peak grew by {growth / 1e6:.1f} MB for {extra / 1e6:.1f} MB more text"
