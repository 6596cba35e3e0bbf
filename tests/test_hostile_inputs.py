"""The commands and loaders on hostile input, by class: every path argument given every kind of file,
every config and metadata field given any JSON value, every numeric flag given any size.

The contract (see also test_reliability.py): each ends in one line on stderr and a status of
1 (the run failed) or 2 (a usage error), 130 on Ctrl-C; or it works. Never a traceback, a
MemoryError, a hang, a wait on a FIFO, an endless read, or a silently different answer.

The commands run in this process (their main functions) wherever the behaviour does not need a
real process; `deadline` turns a hang into a failure instead of a stuck test run.
"""

import contextlib
import errno
import io
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from dataclasses import fields, replace
from pathlib import Path

import numpy
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from minillm import checkpoint, cli, evaluate, generate_cli, gradcheck, hf, options, sft, testing, train_cli, training
from minillm.errors import ConfigError
from minillm.model import GPT, GPTConfig
from minillm.tokenizers.bpe import BPETokenizer, TokenizerError
from minillm.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, max_iters=2, warmup_iters=1, lr_decay_iters=2,
    eval_interval=2, eval_iters=1, save_interval=2, log_interval=1, sample_tokens=4, threads=1, device="cpu",
)
HUGE = 2**40  # sizes from here up are refused by any allocator at once, never half-allocated
in_process = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Hang(Exception):
    """Raised by `deadline`: deliberately not an OSError, which the commands report as their own errors."""


@contextlib.contextmanager
def deadline(seconds):
    """Fail (raise Hang) if the block is still running after `seconds`: a FIFO opened for reading, say."""

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def flags(**options):
    return [str(item) for name, value in {**TINY, **options}.items() for item in (f"--{name.replace('_', '-')}", value)]


def call(main, argv, capsys, seconds=30):
    """(exit status, stdout, stderr) of a command's main function run here on argv."""
    capsys.readouterr()
    try:
        with deadline(seconds):
            status = main([str(arg) for arg in argv])
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err, status, statuses=(1, 2)):
    """The single line a failed command printed, after checking its status."""
    assert status in statuses, f"status {status}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(training.data.builtin_corpus()[:4000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """The out dir of a tiny run (ckpt.npz, last.npz), trained in this process."""
    out = tmp_path_factory.mktemp("trained")
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_cli.main(["--data", str(corpus), "--out-dir", str(out), *flags()]) == 0
    return out


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory, corpus):
    """A checkpoint with a small trained BPE tokenizer, and that tokenizer's folder (vocab.json, merges.txt)."""
    folder = tmp_path_factory.mktemp("bpe")
    tokenizer = BPETokenizer.train(corpus.read_text(encoding="utf-8"), vocab_size=300)
    tokenizer.save(folder)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8))
    checkpoint.save(folder / "ckpt.npz", model, tokenizer)
    return folder


# ---------------------------------------------------------------- every path argument, every kind of file

FILE_KINDS = ["missing", "folder", "FIFO", "character device", "link loop"]


def make(kind, path):
    """Put a `kind` at path (nothing for "missing")."""
    if kind == "folder":
        path.mkdir()
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "character device":
        path.symlink_to("/dev/zero")  # read to the end, it would fill the memory
    elif kind == "link loop":
        path.symlink_to(path)


def gpt2_dir(folder, bpe_folder, broken):
    """A GPT-2 directory whose file named `broken` is left for the test to make; the others are valid."""
    folder.mkdir()
    model = GPT(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=8))
    hf.save_pretrained(model, folder, BPETokenizer.load(bpe_folder))
    (folder / broken).unlink()
    return folder, folder / broken


def path_case(name, tmp_path, trained, corpus, bpe_checkpoint, file_name="target.txt"):
    """(main, argv, the path that gets the hostile kind) for one path argument of one command."""
    ckpt = trained / "ckpt.npz"
    out = tmp_path / "out"
    target = tmp_path / file_name
    if name == "train --config":
        return train_cli.main, ["--config", target, "--out-dir", out, *flags()], target
    if name == "train --data":
        return train_cli.main, ["--data", target, "--out-dir", out, *flags()], target
    if name == "train --data folder/a.txt":
        folder = tmp_path / "texts"
        folder.mkdir()
        target = folder / "a.txt"
        return train_cli.main, ["--data", folder, "--out-dir", out, *flags()], target
    if name == "train --sft":
        return train_cli.main, ["--sft", target, "--out-dir", out, *flags()], target
    if name == "train --init-from":
        return train_cli.main, ["--data", corpus, "--init-from", target, "--out-dir", out, *flags()], target
    if name == "train --resume (last.npz)":
        out.mkdir()
        return train_cli.main, ["--data", corpus, "--resume", "--out-dir", out, *flags()], out / "last.npz"
    if name.startswith("train --init-from GPT-2 dir/"):
        folder, target = gpt2_dir(tmp_path / "gpt2", bpe_checkpoint, name.rsplit("/", 1)[1])
        return train_cli.main, ["--data", corpus, "--init-from", folder, "--out-dir", out, *flags()], target
    if name == "generate --ckpt":
        return generate_cli.main, ["--ckpt", target, "--max-new-tokens", 2, "--device", "cpu"], target
    if name == "generate --prompt-file":
        return generate_cli.main, ["--ckpt", ckpt, "--prompt-file", target, "--max-new-tokens", 2,
                                   "--device", "cpu"], target
    if name == "evaluate --ckpt":
        return evaluate.main, ["--ckpt", target, "--task", "addition", "--device", "cpu"], target
    if name == "evaluate --data":
        return evaluate.main, ["--ckpt", ckpt, "--data", target, "--device", "cpu"], target
    raise ValueError(name)


PATH_ARGUMENTS = [
    "train --config", "train --data", "train --data folder/a.txt", "train --sft", "train --init-from",
    "train --resume (last.npz)", "train --init-from GPT-2 dir/config.json", "train --init-from GPT-2 dir/vocab.json",
    "train --init-from GPT-2 dir/merges.txt", "train --init-from GPT-2 dir/model.safetensors",
    "generate --ckpt", "generate --prompt-file", "evaluate --ckpt", "evaluate --data",
]


@settings(in_process, max_examples=30)
@given(argument=st.sampled_from(PATH_ARGUMENTS), kind=st.sampled_from(FILE_KINDS), data=st.data(),
       file_name=st.sampled_from(["target.txt", "two\nlines.txt", "a\u2028b.txt", "tab\tand space.txt"]))
def test_every_path_argument_names_what_the_path_is_instead_of_a_file(
    tmp_path_factory, capsys, trained, corpus, bpe_checkpoint, argument, kind, data, file_name
):
    # A folder given as --init-from is a GPT-2 directory; a folder of texts without a.txt has no text at all.
    if (kind, argument) in (("folder", "train --init-from"), ("missing", "train --data folder/a.txt")):
        kind = data.draw(st.sampled_from(["FIFO", "link loop", "character device"]))
    tmp_path = tmp_path_factory.mktemp("kinds")
    main, argv, target = path_case(argument, tmp_path, trained, corpus, bpe_checkpoint, file_name)
    make(kind, target)
    status, _, err = call(main, argv, capsys, seconds=20)
    line = one_line(err, status)  # a line break in the file's name is escaped, not printed
    assert str(target.parent) in line and cli.one_line(target.name) in line, line
    if kind != "missing":
        assert "no such" not in line and " no " + target.name not in line, line  # it exists: not "missing"


# ---------------------------------------------------------------- any JSON value in any field

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10, max_value=100)
    | st.integers(min_value=HUGE, max_value=10**30) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)
# Values of the kinds the fields hold, often valid ones: drawn from json_values alone, few examples would get
# past the checks to the value the properties then check was taken as it was written.
typical_values = (
    st.integers(min_value=0, max_value=8) | st.floats(min_value=0, max_value=1, exclude_max=True)
    | st.floats(min_value=0, max_value=100) | st.booleans()
    | st.sampled_from(["float32", "float64", "char", "attn", "mlp", "attn,mlp"])
)
DEEP = "[" * 100_000  # deeper than Python's recursion limit


def type_matches(kind, value):
    """Whether a value is of an option's type, with bool not counted as a number."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


TRAIN_FIELDS = {field.name: field.type for field in fields(TrainConfig)}


@settings(max_examples=60)
@given(name=st.sampled_from(sorted(TRAIN_FIELDS)), value=json_values | typical_values | st.just(DEEP),
       dashes=st.booleans())
def test_a_config_file_value_of_any_json_type_is_taken_only_if_of_the_option_type(
    tmp_path_factory, name, value, dashes
):
    path = tmp_path_factory.mktemp("config") / "options.json"
    key = name.replace("_", "-") if dashes else name
    path.write_text(value if value is DEEP else json.dumps({key: value}), encoding="utf-8")
    # --out-dir (away from the working folder's out/, which a --resume would read) wins over the file's out_dir.
    away = [] if name == "out_dir" else ["--out-dir", str(path.parent / "out")]
    args = train_cli.build_parser().parse_args(["--config", str(path), *away])
    try:
        with deadline(10):
            cfg = train_cli.resolve_config(args)
            options.validate(cfg)
    except (*cli.USAGE_ERRORS, checkpoint.CheckpointError) as err:
        assert len(str(err).splitlines()) == 1, str(err)
        return
    assert value is not DEEP
    several_files = name == "data" and isinstance(value, list) and value and all(isinstance(v, str) and v
                                                                                  for v in value)
    assert several_files or type_matches(TRAIN_FIELDS[name], value), f"{name} = {value!r} was accepted"
    taken = getattr(cfg, name)
    assert taken == value and type(taken) is type(value), f"{name} = {value!r} was taken as {taken!r}"


HF_KEYS = ["n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "resid_pdrop", "n_inner", "layer_norm_epsilon",
           "model_type", "activation_function", "scale_attn_weights"]


# The config.json keys that become a GPTConfig field, and the type the field takes.
HF_FIELDS = {"n_layer": ("n_layer", int), "n_head": ("n_head", int), "n_embd": ("n_embd", int),
             "n_positions": ("block_size", int), "vocab_size": ("vocab_size", int), "resid_pdrop": ("dropout", float)}
# The others only say how GPT-2 computes: a value is taken only where it means what minillm computes.
GPT2_COMPUTATION = {
    "n_inner": lambda value: value is None or (type_matches(int, value) and value == 4 * 4),  # 4 * n_embd
    "layer_norm_epsilon": lambda value: type_matches(float, value) and value == hf.layernorm.EPS,
    "model_type": lambda value: value == "gpt2",
    "activation_function": lambda value: value in hf.GELU_TANH,
    "scale_attn_weights": bool,
}


@settings(max_examples=100)
@given(key=st.sampled_from(HF_KEYS), value=json_values | typical_values)
def test_a_gpt2_config_json_value_of_any_type_gives_a_config_or_a_pretrained_error(key, value):
    written = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    config = hf.config_to_hf(written, "float32")
    config[key] = value
    try:
        loaded = hf.config_from_hf(config)
    except hf.PretrainedError as err:
        assert len(str(err).splitlines()) == 1, str(err)
        return
    if key in HF_FIELDS:
        field, kind = HF_FIELDS[key]
        assert type_matches(kind, value), f"{key} = {value!r} was accepted"
        assert loaded == replace(written, **{field: value}) and type(getattr(loaded, field)) is type(value), loaded
    else:
        assert GPT2_COMPUTATION[key](value), f"{key} = {value!r} was accepted"
        assert loaded == written, loaded


def replace_meta(data, edit):
    """The bytes of a checkpoint whose meta.json is edit(meta) (a dict), or edit's text when it returns a str."""
    source = zipfile.ZipFile(io.BytesIO(data))
    meta = json.loads(numpy.load(io.BytesIO(source.read("meta.json.npy"))).tobytes())
    edited = edit(meta)
    text = edited if isinstance(edited, str) else json.dumps(edited)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            member = source.read(info)
            if info.filename == "meta.json.npy":
                npy = io.BytesIO()
                numpy.lib.format.write_array(npy, numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8))
                member = npy.getvalue()
            target.writestr(info.filename, member)
    return buffer.getvalue()


def setter(path, value):
    """An edit that sets meta[path[0]][path[1]]... to value (where the containers exist)."""

    def edit(meta):
        container = meta
        for key in path[:-1]:
            container = container[key]
        container[path[-1]] = value
        return meta

    return edit


META_FIELDS = [
    ("format",), ("dtype",), ("config",), ("tokenizer",), ("step",), ("optimizer_step",),
    *[("config", name) for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias",
                                    "lora_rank", "lora_alpha", "lora_targets")],
    ("tokenizer", "kind"), ("tokenizer", "chars"),
]


@settings(in_process, max_examples=60)
@given(path=st.sampled_from(META_FIELDS), value=json_values | typical_values | st.just(DEEP))
def test_checkpoint_metadata_of_any_json_value_loads_or_is_a_checkpoint_error(tmp_path_factory, trained, path, value):
    damaged = tmp_path_factory.mktemp("meta") / "ckpt.npz"
    edit = (lambda meta: DEEP) if value is DEEP else setter(path, value)
    damaged.write_bytes(replace_meta((trained / "last.npz").read_bytes(), edit))
    try:
        with deadline(10):
            model, tokenizer, meta, optimizer_state = checkpoint.load(damaged)
    except checkpoint.CheckpointError as err:
        assert len(str(err).splitlines()) == 1, str(err)
        return
    assert value is not DEEP
    if path in (("step",), ("optimizer_step",)):  # counts: loaded as written, or refused
        assert type_matches(int, value) and value >= 0, f"{path} = {value!r} was accepted"
    # What the loaded model, tokenizer and optimizer hold where the value was written.
    held = {"format": checkpoint.FORMAT, "dtype": model.dtype.name, "config": model.config.to_dict(),
            "tokenizer": tokenizer.to_dict(), "step": meta["step"], "optimizer_step": optimizer_state["t"]}
    for key in path:
        held = held[key]
    assert held == value and isinstance(held, bool) == isinstance(value, bool), f"{path}: {value!r} loaded as {held!r}"


RESUME_FIELDS = [("step",), ("best_val_loss",), ("evals_since_best",), ("optimizer_step",), ("train_config",),
                 *[("train_config", name) for name in ("n_layer", "lr", "dropout", "bias", "lora_targets", "threads")]]


RESUMED_AS = {("step",): "step", ("best_val_loss",): "best_val", ("evals_since_best",): "since_best"}


@settings(in_process, max_examples=50)
@given(path=st.sampled_from(RESUME_FIELDS), value=json_values | typical_values)
def test_resuming_from_a_last_npz_with_any_json_value_trains_or_fails_in_one_line(
    tmp_path_factory, capsys, monkeypatch, trained, corpus, path, value
):
    out = tmp_path_factory.mktemp("resume")
    (out / "last.npz").write_bytes(replace_meta((trained / "last.npz").read_bytes(), setter(path, value)))
    (out / "ckpt.npz").write_bytes((trained / "ckpt.npz").read_bytes())  # else the best val loss starts afresh
    set_up = []
    monkeypatch.setattr(training, "loop", lambda run, *rest: set_up.append(run))  # then stop as Ctrl-C would
    # The trained run is complete at its step 2: resumed to step 4, it is set up to train on.
    argv = ["--data", corpus, "--out-dir", out, "--resume", "--max-iters", 4]
    status, out_text, err = call(train_cli.main, argv, capsys)
    if status == 0:  # a step at or past --max-iters: the run is complete, which it says at once
        assert path == ("step",) and value >= 4 and "is complete at step" in out_text, out_text
        return
    if status != cli.INTERRUPTED:
        one_line(err, status)
        return
    [run] = set_up
    if path in RESUMED_AS:
        held = getattr(run, RESUMED_AS[path])
    elif path == ("optimizer_step",):
        held = run.optimizer.t
    elif path == ("train_config", "threads"):  # the machine's option, never the saved run's: decided here
        assert run.cfg.threads == (training.system.usable_cores() if run.device == "cpu" else 1)
        return
    elif path == ("train_config",):  # each option as saved, but those the command line or the machine decides
        decided_here = {"data", "out_dir", "resume", "max_iters", *training.MACHINE_OPTIONS}
        saved = {key: item for key, item in value.items() if key.replace("-", "_") not in decided_here}
        taken = {key: getattr(run.cfg, key.replace("-", "_")) for key in saved}
        assert taken == saved, f"train_config {value!r} was taken as {taken!r}"
        return
    else:
        held = getattr(run.cfg, path[1])
    assert held == value and isinstance(held, bool) == isinstance(value, bool), f"{path}: {value!r} taken as {held!r}"


# ---------------------------------------------------------------- the zip inside a checkpoint


def rezipped(data, extra=(), compression=zipfile.ZIP_STORED):
    """A checkpoint's bytes with (name, bytes) members added after its own."""
    source = zipfile.ZipFile(io.BytesIO(data))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        for name, member in extra:
            with (pytest.warns(UserWarning, match="Duplicate") if name in source.namelist()
                  else contextlib.nullcontext()):
                target.writestr(name, member)
    return buffer.getvalue()


def npy_bytes(array):
    buffer = io.BytesIO()
    numpy.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def test_a_member_stored_twice_is_refused_rather_than_the_later_copy_loaded(tmp_path, trained):
    data = (trained / "ckpt.npz").read_bytes()
    wte = numpy.load(io.BytesIO(zipfile.ZipFile(io.BytesIO(data)).read("params/wte.weight.npy")))
    path = tmp_path / "twice.npz"
    path.write_bytes(rezipped(data, [("params/wte.weight.npy", npy_bytes(wte + 1))]))
    with pytest.raises(checkpoint.CheckpointError, match="appears twice"):
        checkpoint.load(path)


@settings(max_examples=10)
@given(length=st.integers(min_value=HUGE, max_value=10**15))
def test_a_member_that_declares_a_huge_shape_is_refused_before_it_is_inflated(tmp_path_factory, trained, length):
    data = (trained / "ckpt.npz").read_bytes()
    header = io.BytesIO()
    numpy.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (length,)})
    path = tmp_path_factory.mktemp("huge") / "ckpt.npz"
    source = zipfile.ZipFile(io.BytesIO(data))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            member = source.read(info)
            target.writestr(info.filename,
                            header.getvalue() + b"\0" * 64 if info.filename == "params/wpe.weight.npy" else member)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(checkpoint.CheckpointError, match="wpe.weight"):
        checkpoint.load(path)


def test_loading_opens_only_the_members_the_model_needs(tmp_path, trained, monkeypatch):
    """An unused member (here 64 MiB of zeros, deflated to a few KB) is never inflated."""
    path = tmp_path / "padded.npz"
    path.write_bytes(rezipped((trained / "ckpt.npz").read_bytes(), [("extra/zeros.npy", bytes(64 << 20))],
                              compression=zipfile.ZIP_DEFLATED))
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: opened.append(getattr(name, "filename", name))
                        or real_open(self, name, *a, **k))
    model, *_ = checkpoint.load(path)
    assert "extra/zeros.npy" not in opened and "params/wte.weight.npy" in opened


def test_a_single_npy_array_is_named_as_such(tmp_path):
    path = tmp_path / "w.npy"
    numpy.save(path, numpy.zeros(3, dtype=numpy.float32))
    with pytest.raises(checkpoint.CheckpointError, match=r"single NumPy array \(\.npy\)"):
        checkpoint.load(path)


# ---------------------------------------------------------------- numbers of any size


NUMERIC_OPTIONS = sorted(name for name, kind in TRAIN_FIELDS.items() if kind in (int, float))
sizes = (
    st.integers(min_value=HUGE, max_value=10**30) | st.integers(min_value=-(10**30), max_value=-1) | st.just(0)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=1, max_value=4)  # small enough to be taken: then the value set up is checked
)


@settings(in_process, max_examples=30)
@given(name=st.sampled_from(NUMERIC_OPTIONS), value=sizes)
def test_a_numeric_training_option_of_any_size_is_set_up_or_refused_in_one_line(
    tmp_path_factory, capsys, monkeypatch, corpus, name, value
):
    out = tmp_path_factory.mktemp("sizes")
    set_up = []
    monkeypatch.setattr(training, "loop", lambda run, *rest: set_up.append(run))  # set-up only, then stop
    status, _, err = call(train_cli.main, ["--data", corpus, "--out-dir", out, *flags(**{name: value})], capsys)
    if status != cli.INTERRUPTED:
        one_line(err, status)
        return
    given = TRAIN_FIELDS[name](str(value))  # as the flag's text is read
    assert given == given, f"--{name} {value} was accepted"  # a NaN, which no option can use
    if name == "threads" and given == 0:  # 0: one per core
        given = training.system.usable_cores()
    [run] = set_up
    assert getattr(run.cfg, name) == given, f"--{name} {value} was set up as {getattr(run.cfg, name)!r}"


# Each option: the argument of sampling.stream it becomes, and the type its text is read as.
GENERATE_SIZES = {"num-samples": ("rows", int), "top-k": ("top_k", int), "top-p": ("top_p", float),
                  "temperature": ("temperature", float), "seed": ("seed", int)}


SAMPLING_STREAM = generate_cli.stream  # taken before any test replaces it


def recording_stream(used):
    """sampling.stream as generate.py calls it, noting into `used` its arguments and the tokens it draws."""

    def record(model, idx, max_new_tokens, temperature, top_k, top_p, seed, **options):
        used.update(prompt=list(idx[0]), rows=len(idx), max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed, drawn=[])
        for next_ids in SAMPLING_STREAM(model, idx, max_new_tokens, temperature, top_k, top_p, seed, **options):
            used["drawn"].append(int(training.backend.to_host(next_ids)[0]))
            yield next_ids

    return record


@settings(in_process, max_examples=40)
@given(name=st.sampled_from(sorted(GENERATE_SIZES)), value=sizes)
def test_a_numeric_sampling_option_of_any_size_samples_or_is_refused_in_one_line(
    capsys, monkeypatch, trained, name, value
):
    used = {}
    monkeypatch.setattr(generate_cli, "stream", recording_stream(used))
    argv = ["--ckpt", trained / "ckpt.npz", "--max-new-tokens", 2, "--device", "cpu", f"--{name}", value]
    status, out, err = call(generate_cli.main, argv, capsys)
    if status != 0:
        one_line(err, status)
        return
    argument, kind = GENERATE_SIZES[name]
    given = kind(str(value))  # as the flag's text is read
    assert given == given and used[argument] == given, f"--{name} {value} was used as {used.get(argument)!r}"
    # Each sample (a character model's: one character a token) is its 2 new tokens and a newline.
    samples = out.split(generate_cli.SEPARATOR + "\n")
    assert len(used["drawn"]) == 2 and [len(sample) for sample in samples] == [3] * used["rows"], out


@settings(max_examples=30)
@given(lr=st.floats(min_value=1e-6, max_value=10), min_lr=st.floats(min_value=0, max_value=10))
def test_the_learning_rate_floor_never_exceeds_the_peak(lr, min_lr):
    cfg = TrainConfig(lr=lr, min_lr=min_lr)
    if min_lr <= lr:
        options.validate(cfg)
    else:
        with pytest.raises(ConfigError, match="--min-lr"):
            options.validate(cfg)


# ---------------------------------------------------------------- empty and conflicting options


@pytest.mark.parametrize("option", ["data", "sft", "out-dir", "init-from"])
def test_an_empty_training_option_is_refused_not_taken_as_absent(tmp_path, capsys, option):
    status, _, err = call(train_cli.main, [f"--{option}", "", "--out-dir" if option != "out-dir" else "--seed",
                                           tmp_path if option != "out-dir" else 1, *flags()], capsys)
    assert f"--{option}" in one_line(err, status, (2,))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["ckpt", "out-dir", "init-from", "prompt-file"])
def test_an_empty_sampling_option_is_refused_not_taken_as_absent(capsys, option):
    status, _, err = call(generate_cli.main, [f"--{option}", ""], capsys)
    line = one_line(err, status, (2,))
    assert f"--{option}" in line and "empty" in line, line


@pytest.mark.parametrize("stray", [["--lora-targets", "foo"], ["--lora-targets", "mlp"], ["--lora-alpha", "4"]])
def test_lora_options_without_a_rank_are_refused(tmp_path, capsys, corpus, stray):
    status, _, err = call(train_cli.main, ["--data", corpus, "--out-dir", tmp_path, *flags(), *stray], capsys)
    assert "--lora-rank" in one_line(err, status, (2,))


def test_resume_with_init_from_is_refused_rather_than_init_from_dropped(tmp_path, capsys, trained, corpus):
    (tmp_path / "last.npz").write_bytes((trained / "last.npz").read_bytes())
    argv = ["--data", corpus, "--out-dir", tmp_path, "--resume", "--init-from", trained / "ckpt.npz"]
    status, _, err = call(train_cli.main, argv, capsys)
    line = one_line(err, status, (2,))
    assert "--resume" in line and "--init-from" in line, line


# ---------------------------------------------------------------- text: tokenizer files, JSONL, prompts


@settings(max_examples=10)
@given(fraction=st.floats(min_value=0.0, max_value=1.0))
def test_a_merges_file_cut_short_is_refused_not_read_as_special_tokens(tmp_path_factory, bpe_checkpoint, fraction):
    folder = tmp_path_factory.mktemp("merges")
    (folder / "vocab.json").write_bytes((bpe_checkpoint / "vocab.json").read_bytes())
    lines = (bpe_checkpoint / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    kept = 1 + int(fraction * (len(lines) - 1))  # the #version line, then a part of the merges (or all)
    (folder / "merges.txt").write_text("".join(lines[:kept]), encoding="utf-8")
    if kept == len(lines):
        assert BPETokenizer.load(folder).vocab_size == 300
        return
    with pytest.raises(TokenizerError, match="missing merges"):
        BPETokenizer.load(folder)


line_breaks_inside_strings = st.sampled_from(["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"])
texts = st.lists(st.characters(blacklist_categories=("Cs",)) | line_breaks_inside_strings, max_size=12).map("".join)


@settings(max_examples=30)
@given(pairs=st.lists(st.tuples(texts, texts.filter(bool)), min_size=2, max_size=4))
def test_jsonl_lines_are_split_at_newlines_only(tmp_path_factory, pairs):
    path = tmp_path_factory.mktemp("jsonl") / "pairs.jsonl"
    lines = [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in pairs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [(p, c) for _, p, c in sft.read_jsonl(path)] == pairs


def test_a_jsonl_line_nested_too_deeply_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + DEEP + "\n", encoding="utf-8")
    with pytest.raises(sft.SFTError, match="line 2: the JSON is nested too deeply"):
        sft.read_jsonl(path)


# Text with white space at its ends, too: a prompt is continued as it was given, never stripped.
texts_as_given = st.lists(st.sampled_from([" ", "\n", "\t", "a", "é", "€", "😀"]), min_size=1, max_size=6).map("".join)


@settings(in_process, max_examples=30)
@given(raw=st.binary(min_size=1, max_size=8) | texts_as_given.map(str.encode))
def test_a_prompt_of_any_bytes_on_a_bpe_model_samples_or_is_a_usage_error(capsys, monkeypatch, bpe_checkpoint, raw):
    prompt = os.fsdecode(raw)  # what the shell hands Python for these bytes
    if "\0" in prompt or prompt == "-":
        return  # no shell can pass a NUL byte; "-" means standard input
    used = {}
    monkeypatch.setattr(generate_cli, "stream", recording_stream(used))
    argv = ["--ckpt", bpe_checkpoint / "ckpt.npz", f"--prompt={prompt}", "--max-new-tokens", 2, "--device", "cpu"]
    status, out, err = call(generate_cli.main, argv, capsys)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert "not UTF-8" in one_line(err, status, (2,))
        return
    assert status == 0, err
    tokenizer = BPETokenizer.load(bpe_checkpoint)
    assert tokenizer.decode(used["prompt"]) == prompt  # the model continues the prompt itself
    # 2 new tokens, fewer only when one is the end of the text.
    drawn = used["drawn"]
    assert len(drawn) == 2 or drawn[-1] == tokenizer.eot_id, drawn
    new_text = tokenizer.decode([token for token in drawn if token != tokenizer.eot_id])
    assert out == prompt + new_text + "\n", (out, prompt, new_text)


# ---------------------------------------------------------------- exit statuses


@pytest.mark.skipif(training.backend.cuda_available(), reason="here --device cuda works")
def test_the_same_error_has_the_same_status_in_every_command(tmp_path, capsys, trained, corpus):
    commands = [
        (train_cli.main, ["--data", corpus, "--out-dir", tmp_path, *flags(device="cuda")]),
        (generate_cli.main, ["--ckpt", trained / "ckpt.npz", "--device", "cuda"]),
        (evaluate.main, ["--ckpt", trained / "ckpt.npz", "--task", "addition", "--device", "cuda"]),
        (gradcheck.main, ["--device", "cuda"]),
    ]
    results = [call(main, argv, capsys) for main, argv in commands]
    messages = {one_line(err, status).split(": error: ", 1)[1] for status, _, err in results}
    assert len(messages) == 1, messages
    assert {status for status, _, _ in results} == {cli.USAGE}


# Runs train.py as `python train.py ...` would, with a Ctrl-C `delay` seconds after the script starts
# (after the interpreter's own start-up, which no script can guard).
LAUNCH = """
import os, runpy, signal, sys, threading
delay = float(sys.argv.pop(1))
if delay >= 0:
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
runpy.run_path("train.py", run_name="__main__")
"""


def start_training(tmp_path, corpus, delay=-1.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(delay), "--data", str(corpus), "--out-dir", str(tmp_path / "out"),
         *flags(max_iters=100_000, lr_decay_iters=100_000, eval_interval=100_000, save_interval=100_000)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


@pytest.mark.parametrize("delay", [0.02, 0.1, 0.3])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path, corpus, delay):
    proc = start_training(tmp_path, corpus, delay)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) <= 1, stderr


def test_a_second_ctrl_c_during_a_step_exits_130_without_a_traceback(tmp_path, corpus):
    proc = start_training(tmp_path, corpus)
    log = tmp_path / "out" / "log.jsonl"
    with deadline(60):
        while not log.exists() or not log.read_text():
            time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_standard_output_is_one_line_naming_it(trained):
    with open("/dev/full", "w", encoding="utf-8") as full:
        result = subprocess.run(
            [sys.executable, "generate.py", "--ckpt", str(trained / "ckpt.npz"), "--max-new-tokens", "300",
             "--device", "cpu"], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    assert "standard output" in one_line(result.stderr, result.returncode, (1,))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
@pytest.mark.parametrize("failing", ["train.bin", "val.bin", "loss.png"])
def test_a_full_disk_while_writing_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, corpus, failing):
    real_fsync = os.fsync

    def fsync(fd):  # the temporary file beside `failing` is the one being written
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{failing}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    status, _, err = call(train_cli.main, ["--data", corpus, "--out-dir", tmp_path, *flags()], capsys)
    line = one_line(err, status, (1,))
    assert failing in line and "No space left on device" in line, line


def test_outputs_are_written_with_the_users_umask(tmp_path, corpus):
    result = subprocess.run(
        [sys.executable, "train.py", "--data", str(corpus), "--out-dir", str(tmp_path), *flags()],
        cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o027),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert set(modes.values()) == {0o640}, {name: oct(mode) for name, mode in modes.items()}


# ---------------------------------------------------------------- the gradient checker


def test_every_gradcheck_option_is_documented(capsys):
    status, out, _ = call(gradcheck.main, ["--help"], capsys)
    assert status == 0
    options = out.split("options:", 1)[1].splitlines()
    # An option's entry is its flags (and metavar), then its help: on the same line after two
    # spaces or more, or on the next line, indented further.
    undocumented = [
        line.split()[0] for i, line in enumerate(options)
        if line.startswith("  -") and "  " not in line.strip()
        and not (i + 1 < len(options) and options[i + 1].startswith(" " * 8))
    ]
    assert not undocumented, undocumented


@settings(in_process, max_examples=25)
@given(option=st.sampled_from(["vocab-size", "block-size", "n-layer", "n-head", "n-embd", "batch-size", "dropout",
                               "tolerance", "lora-rank"]),
       value=st.integers(min_value=-5, max_value=0) | st.sampled_from([math.nan, math.inf, -math.inf]))
def test_gradcheck_refuses_options_it_cannot_check_in_one_line(capsys, option, value):
    if value == 0 and option in ("lora-rank", "dropout"):  # 0 is valid there: no adapters, no dropout
        value = -1
    status, out, err = call(gradcheck.main, [f"--{option}", value, "--n-layer", 1] if option != "n-layer"
                            else [f"--{option}", value], capsys)
    assert "passed" not in out
    one_line(err, status, (2,))


def test_gradcheck_states_the_model_it_checks(capsys):
    status, out, _ = call(gradcheck.main, ["--n-layer", 1, "--n-embd", 4, "--n-head", 2, "--block-size", 3], capsys)
    assert status == 0
    assert "n_layer 1, n_head 2, n_embd 4" in out and "block_size 3" in out


def test_gradcheck_never_passes_an_error_it_could_not_compare(capsys, monkeypatch):
    """A NaN relative error (the numerical gradient itself NaN) is WRONG, not a pass."""
    nan_gradient = lambda analytic, f, x, tolerance: (math.nan, x * math.nan)
    monkeypatch.setattr(gradcheck, "best_numerical_gradient", nan_gradient)
    monkeypatch.setattr(testing.check, "best_numerical_gradient", nan_gradient)
    status, out, _ = call(gradcheck.main, ["--n-layer", 1], capsys)
    assert status == 1 and " 0 passed" in out


def test_gradcheck_fails_a_gradient_that_is_zero_in_both_readings(capsys, monkeypatch):
    """Fresh LoRA adapters have b = 0, so the loss does not depend on a: both of a's gradients are 0,
    which relative_error calls a perfect match. Without the random weights, the checker must say
    that it compared nothing rather than pass."""
    monkeypatch.setattr(gradcheck, "randomize", lambda params, seed: None)
    status, out, _ = call(gradcheck.main, ["--n-layer", 1, "--lora-rank", 2], capsys)
    lora_a_rows = [line for line in out.splitlines() if line.startswith("h.") and ".lora_a" in line]
    assert lora_a_rows and all(line.endswith("unchecked") for line in lora_a_rows), out
    assert status == 1


@pytest.mark.parametrize("field", ["optimizer_step", "step", "evals_since_best"])
def test_resuming_from_a_negative_count_is_one_line_not_a_traceback(tmp_path, capsys, trained, corpus, field):
    """A count in last.npz (optimizer_step, step, evals_since_best) below 0 is refused by the loader in one
    line naming it, before a step is taken with it (optimizer_step -1 would divide by zero in AdamW)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.npz").write_bytes(replace_meta((trained / "last.npz").read_bytes(), setter((field,), -1)))
    with pytest.raises(checkpoint.CheckpointError, match=f"{field} must be a whole number of 0 or more, got -1"):
        checkpoint.load(out / "last.npz")
    status, _, err = call(train_cli.main, ["--data", corpus, "--out-dir", out, "--resume", "--max-iters", 4], capsys)
    assert f"{field} must be a whole number of 0 or more" in one_line(err, status, statuses=(1,))
