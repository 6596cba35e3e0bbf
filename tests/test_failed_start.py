"""A run that fails before its first step removes what its start created in the out dir (the out dir itself
when it made it) and never anything that was there before; a run that fails later keeps what it wrote."""

import os

import pytest

from minillm import checkpoint, train_cli

TINY = ["--max-iters", "5", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
        "--sample-tokens", "0", "--threads", "1", "--batch-size", "2", "--eval-iters", "1", "--device", "cpu"]


def train(*flags):
    return train_cli.main([*TINY, *flags])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("pretrained") / "out"
    assert train("--data", str(corpus), "--out-dir", str(out)) == 0
    return out / "ckpt.npz"


def failures(tmp_path, corpus, pretrained):
    """name -> the flags of a start that fails, each at a different point of the setup."""
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    bad = tmp_path / "bad.npz"
    bad.write_text("not a checkpoint")
    return {
        "missing data": ["--data", str(tmp_path / "missing.txt")],
        "corpus too small": ["--data", str(tiny)],
        "bad --init-from": ["--data", str(corpus), "--init-from", str(bad)],
        # found after the token files are written
        "bad option value": ["--data", str(corpus), "--init-from", str(pretrained), "--freeze-blocks", "3"],
    }


CASES = ["missing data", "corpus too small", "bad --init-from", "bad option value"]


@pytest.mark.parametrize("case", CASES)
def test_a_failed_start_removes_the_out_dir_it_made(tmp_path, corpus, pretrained, case, capsys):
    flags = failures(tmp_path, corpus, pretrained)[case]
    out = tmp_path / "new_dir" / "run"
    assert train("--out-dir", str(out), *flags) != 0
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "new_dir").exists()


def snapshot(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


# the failures that come after the start wrote its token files
@pytest.mark.parametrize("case", ["bad option value"])
def test_a_failed_start_keeps_an_existing_out_dir_whole(tmp_path, corpus, pretrained, case, capsys):
    flags = failures(tmp_path, corpus, pretrained)[case]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "sub").mkdir()
    (out / "sub" / "data.txt").write_text("kept")
    before = snapshot(out)
    assert train("--out-dir", str(out), *flags) != 0
    assert "error:" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_failed_start_keeps_an_empty_existing_out_dir(tmp_path, corpus, pretrained, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    flags = failures(tmp_path, corpus, pretrained)["bad option value"]
    assert train("--out-dir", str(out), *flags) != 0
    capsys.readouterr()
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_failed_overwrite_keeps_the_earlier_run(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train("--data", str(corpus), "--out-dir", str(out)) == 0
    before = snapshot(out)
    assert train("--data", str(tmp_path / "missing.txt"), "--out-dir", str(out), "--overwrite") != 0
    capsys.readouterr()
    assert snapshot(out) == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="file locks need fcntl")
def test_a_run_refused_by_the_lock_leaves_the_other_runs_files(tmp_path, corpus, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with checkpoint.exclusive(out):
        (out / "train.bin").write_bytes(b"the other run's")
        assert train("--data", str(corpus), "--out-dir", str(out)) != 0
        assert (out / "train.bin").read_bytes() == b"the other run's"
    assert "in use by another training run" in capsys.readouterr().err


def test_a_run_that_fails_after_its_first_step_keeps_what_it_wrote(tmp_path, corpus, capsys):
    out = tmp_path / "diverged"
    # a learning rate this large sends the loss to infinity within a few steps
    code = train("--data", str(corpus), "--out-dir", str(out), "--lr", "1e30", "--max-iters", "50",
                 "--eval-interval", "1000")
    err = capsys.readouterr().err
    assert code != 0 and "the loss is" in err, err
    assert all((out / name).is_file() for name in ("log.jsonl", "train.bin", "val.bin", "ckpt.npz"))
