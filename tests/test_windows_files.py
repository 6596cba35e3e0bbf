"""Files saved on Windows, with CRLF line endings: tokenizer files, prompt files and SFT data are
read as their LF twins; a corpus keeps its "\\r", and a character vocabulary without it says where
it comes from and how to get rid of it."""

import argparse
import json

import pytest

from minillm import checkpoint, generate_cli, sft
from minillm.corpus import Corpus
from minillm.model import GPT, GPTConfig
from minillm.tokenizers.bpe import BPETokenizer
from minillm.tokenizers.char import CharTokenizer, UnknownCharactersError
from minillm.training import TrainConfig, train

CORPUS = "the quick brown fox\njumps over the lazy dog\n" * 40


def crlf(text):
    return text.replace("\n", "\r\n")


def test_crlf_tokenizer_files_load_as_their_lf_twins(tmp_path):
    tokenizer = BPETokenizer.train(CORPUS, vocab_size=256 + 20 + 1)
    vocab_path, merges_path = tokenizer.save(tmp_path / "lf")
    windows = tmp_path / "crlf"
    windows.mkdir()
    # vocab.json as an editor pretty-prints it on Windows; merges.txt with every line ended by "\r\n".
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    (windows / "vocab.json").write_bytes(crlf(json.dumps(vocab, indent=2, ensure_ascii=False)).encode("utf-8"))
    (windows / "merges.txt").write_bytes(crlf(merges_path.read_text(encoding="utf-8")).encode("utf-8"))
    loaded = BPETokenizer.load(windows)
    assert loaded.merges == tokenizer.merges and loaded.vocab == tokenizer.vocab
    assert loaded.encode(CORPUS) == tokenizer.encode(CORPUS)


def test_crlf_prompt_file_reads_as_lf_and_keeps_everything_else(tmp_path):
    prompt = "line one\nline two  \n\ttabbed, é and a lone \r in the middle\n"
    path = tmp_path / "prompt.txt"
    path.write_bytes(crlf(prompt).encode("utf-8"))
    read = generate_cli.read_prompt(argparse.Namespace(prompt=None, prompt_file=str(path)))
    assert read == prompt.removesuffix("\n")


def test_crlf_sft_jsonl_reads_as_lf(tmp_path):
    records = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "a\nb", "completion": "c\r\nd"}]
    path = tmp_path / "train.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\r\n" for r in records).encode("utf-8"))
    # The line endings go; a "\r\n" escaped inside a JSON string is the text's own and stays.
    assert sft.read_jsonl(path) == [(1, "1+1=", "2"), (2, "a\nb", "c\r\nd")]


def test_a_fresh_character_vocabulary_of_a_crlf_corpus_has_carriage_return(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(crlf(CORPUS).encode("utf-8"))
    text = "".join(Corpus.from_paths(str(path)).pieces("\n"))
    assert text == crlf(CORPUS) and "\r" in CharTokenizer.from_text(text).chars


def test_carriage_return_unknown_to_a_character_vocabulary_is_explained():
    with pytest.raises(UnknownCharactersError, match=r"'\\r'.*Windows line endings.*LF") as err:
        CharTokenizer.from_text(CORPUS).encode(crlf(CORPUS))
    assert "\n" not in str(err.value)


def test_fine_tuning_on_a_crlf_corpus_names_line_endings_and_extend_vocab(tmp_path):
    tokenizer = CharTokenizer.from_text(CORPUS)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8), seed=0)
    checkpoint.save(tmp_path / "pretrained.npz", model, tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(crlf(CORPUS).encode("utf-8"))
    options = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, batch_size=2, max_iters=1, device="cpu", threads=1)
    with pytest.raises(UnknownCharactersError, match=r"Windows line endings.*--extend-vocab") as err:
        train(TrainConfig(init_from=str(tmp_path / "pretrained.npz"), data=str(corpus),
                          out_dir=str(tmp_path / "run"), **options))
    assert "\n" not in str(err.value)
