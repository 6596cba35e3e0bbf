"""Weights and configs that no minillm run writes: a NaN or an infinity in a checkpoint or a GPT-2
model.safetensors, and a checkpoint config with a key minillm does not know or without one it needs.
Each is refused with a one-line error naming the file and what is wrong, never loaded."""

import io
import json
import zipfile

import numpy
import pytest
from test_hf import gpt2_tensors, write_gpt2_dir

from minillm import checkpoint, hf
from minillm.errors import CheckpointError
from minillm.model import GPT, GPTConfig
from minillm.tokenizers.char import CharTokenizer

CHARS = "abcdef"
BAD_VALUES = [("nan", numpy.nan, "a NaN"), ("inf", numpy.inf, "an infinity"), ("-inf", -numpy.inf, "an infinity")]


def saved_checkpoint(path, edit=None):
    """A small checkpoint at path; edit(params) may change the parameters before they are saved."""
    model = GPT(GPTConfig(vocab_size=len(CHARS), block_size=4, n_layer=2, n_head=2, n_embd=4), seed=0)
    if edit:
        edit(model.params)
    checkpoint.save(path, model, CharTokenizer(CHARS))
    return path


def refused(error, load, match):
    with pytest.raises(error, match=match) as err:
        load()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("label, value, words", BAD_VALUES, ids=[label for label, _, _ in BAD_VALUES])
def test_checkpoint_with_non_finite_weights_is_refused_naming_the_first(tmp_path, label, value, words):
    def poison(params):
        params["h.1.mlp.c_fc.weight"][2, 3] = value
        params["ln_f.bias"][0] = value  # later in parameter order: not the one named

    path = saved_checkpoint(tmp_path / "ckpt.npz", poison)
    message = refused(CheckpointError, lambda: checkpoint.load(path), rf"h\.1\.mlp\.c_fc\.weight .*{words}")
    assert str(path) in message and "ln_f" not in message
    refused(CheckpointError, lambda: checkpoint.load_pretrained(path), "c_fc")


def test_finite_checkpoint_still_loads(tmp_path):
    path = saved_checkpoint(tmp_path / "ckpt.npz")
    model, _, _, _ = checkpoint.load(path)
    assert all(numpy.isfinite(p).all() for p in model.params.values())


@pytest.mark.parametrize("label, value, words", BAD_VALUES, ids=[label for label, _, _ in BAD_VALUES])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_safetensors_with_non_finite_weights_is_refused_naming_the_first(tmp_path, label, value, words, dtype):
    tensors = {name: t.astype(dtype) for name, t in gpt2_tensors().items()}
    tensors["transformer.h.0.attn.c_proj.weight"][1, 1] = value
    tensors["transformer.h.1.attn.c_proj.weight"][1, 1] = value  # a later parameter: not the one named
    directory = write_gpt2_dir(tmp_path / "gpt2", tensors)
    message = refused(hf.PretrainedError, lambda: hf.from_pretrained(directory),
                      rf"h\.0\.attn\.c_proj\.weight .*{words}")
    assert "model.safetensors" in message and "h.1." not in message


def rewrite_config(path, change):
    """path's checkpoint with change(config) applied to the config in its meta.json."""
    members = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            members[name] = archive.read(name)
    meta = json.loads(numpy.load(io.BytesIO(members["meta.json.npy"])).tobytes())
    change(meta["config"])
    buffer = io.BytesIO()
    numpy.save(buffer, numpy.frombuffer(json.dumps(meta).encode("utf-8"), dtype=numpy.uint8))
    members["meta.json.npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_checkpoint_config_with_an_unknown_key_names_it(tmp_path):
    path = rewrite_config(saved_checkpoint(tmp_path / "ckpt.npz"), lambda config: config.update(extra=1))
    message = refused(CheckpointError, lambda: checkpoint.load(path), r"'extra'.*another version")
    assert str(path) in message and "__init__" not in message and "keyword" not in message


def test_checkpoint_config_without_a_required_key_names_it(tmp_path):
    path = rewrite_config(saved_checkpoint(tmp_path / "ckpt.npz"), lambda config: config.pop("n_embd"))
    message = refused(CheckpointError, lambda: checkpoint.load(path), r"'n_embd'")
    assert str(path) in message and "__init__" not in message and "positional" not in message


def test_checkpoint_config_without_an_optional_key_loads(tmp_path):
    # Keys with defaults (lora_rank, ...) may be absent: a config written before they existed.
    path = rewrite_config(saved_checkpoint(tmp_path / "ckpt.npz"), lambda config: config.pop("lora_rank"))
    checkpoint.load(path)

