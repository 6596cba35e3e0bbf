"""GPT-2 weights in and out (minillm.hf): round trips, an independent GPT-2 forward computed from the
raw file, the name mapping, and clear errors for every kind of bad directory."""

import json

import numpy
import pytest
import safetensors.numpy

from minillm import backend, gradcheck, hf
from minillm.model import GPT, GPTConfig
from minillm.tokenizers.bpe import BPETokenizer
from minillm.tokenizers.char import CharTokenizer

# n_embd 8: c_attn is (8, 24) and c_fc (8, 32), so a transposed weight cannot pass for the right one.
CONFIG = dict(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=8)
IDX = numpy.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(2, 12))


def random_model(dtype="float32", seed=0, **config):
    """A model whose every tensor is N(0, 0.5^2): no zero biases or unit gains that could hide a mix-up."""
    model = GPT(GPTConfig(**(CONFIG | config)), seed=seed, dtype=dtype)
    gradcheck.randomize(model.params, seed)
    return model.eval()


def logits(model, idx=IDX):
    return model(idx)[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, dtype, bias):
    model = random_model(dtype, bias=bias)
    hf.save_pretrained(model, tmp_path)
    loaded, tokenizer = hf.from_pretrained(tmp_path, dtype=dtype)
    assert tokenizer is None and loaded.dtype == model.dtype and not loaded.training
    # GPT-2 always has biases: a bias-free model is written with zero biases, which change nothing.
    assert loaded.config == GPTConfig(**(CONFIG | {"bias": True}))
    assert numpy.array_equal(logits(loaded), logits(model))


def test_round_trip_on_each_device(tmp_path, xp_device):
    model = GPT(GPTConfig(**CONFIG), seed=3, device=xp_device).eval()
    hf.save_pretrained(model, tmp_path)
    loaded, _ = hf.from_pretrained(tmp_path, device=xp_device)
    assert loaded.device == model.device
    assert numpy.array_equal(backend.to_host(logits(loaded)), backend.to_host(logits(model)))


def test_saved_directory_is_in_gpt2s_format(tmp_path):
    model = random_model(vocab_size=300)
    tokenizer = BPETokenizer.train("some text to learn a few merges from, some text", 256 + 10 + 1)
    hf.save_pretrained(model, tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert (config["n_positions"], config["n_ctx"], config["n_embd"]) == (12, 12, 8)
    assert config["eos_token_id"] == tokenizer.eot_id == 266

    with safetensors.safe_open(tmp_path / "model.safetensors", framework="np") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses a file without it
        names = set(f.keys())
    assert names == set(model.params)  # GPT-2's names, without "transformer." as in the gpt2 file on the Hub
    assert {"wte.weight", "h.1.attn.c_attn.weight", "h.1.mlp.c_fc.bias", "ln_f.bias"} <= names

    loaded, loaded_tokenizer = hf.from_pretrained(tmp_path)
    assert loaded_tokenizer.encode("some text") == tokenizer.encode("some text")


def test_char_tokenizer_is_refused_on_save(tmp_path):
    with pytest.raises(hf.PretrainedError, match="CharTokenizer has no GPT-2 file format"):
        hf.save_pretrained(random_model(), tmp_path, CharTokenizer.from_text("abc"))


# -- an independent GPT-2 forward, straight from the file's arrays --------------------------------


def reference_gpt2_logits(tensors, idx, n_layer, n_head):
    """GPT-2's forward pass written out from transformers' GPT-2 tensors (with the "transformer."
    prefix), where every linear layer is a Conv1D: y = x @ W + b with W stored (in, out)."""
    t = lambda name: tensors["transformer." + name]

    def layernorm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / numpy.sqrt(var + 1e-5) * t(name + ".weight") + t(name + ".bias")

    def conv1d(x, name):
        return x @ t(name + ".weight") + t(name + ".bias")

    def gelu(x):
        return 0.5 * x * (1 + numpy.tanh(numpy.sqrt(2 / numpy.pi) * (x + 0.044715 * x**3)))

    B, T = idx.shape
    x = t("wte.weight")[idx] + t("wpe.weight")[:T]
    C = x.shape[-1]
    heads = lambda a: a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)
    future = numpy.triu(numpy.ones((T, T), dtype=bool), k=1)
    for i in range(n_layer):
        q, k, v = numpy.split(conv1d(layernorm(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn"), 3, axis=-1)
        scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / numpy.sqrt(C // n_head)
        scores[..., future] = -numpy.inf
        weights = numpy.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        y = (weights @ heads(v)).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + conv1d(y, f"h.{i}.attn.c_proj")
        x = x + conv1d(gelu(conv1d(layernorm(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return layernorm(x, "ln_f") @ t("wte.weight").T


def gpt2_tensors(seed=1, dtype="float64", n_layer=2, n_embd=8, vocab_size=40, n_positions=12):
    """Random tensors of a GPT-2 as transformers' GPT2LMHeadModel names and shapes them, with the
    tied lm_head and the attention-mask buffers that older files carry."""
    rng = numpy.random.default_rng(seed)
    C = n_embd
    shapes = {"wte.weight": (vocab_size, C), "wpe.weight": (n_positions, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(n_layer):
        for name, shape in {
            "ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
            "mlp.c_proj.bias": (C,),
        }.items():
            shapes[f"h.{i}.{name}"] = shape
    tensors = {"transformer." + name: rng.normal(0, 0.5, shape).astype(dtype) for name, shape in shapes.items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    for i in range(n_layer):
        tensors[f"transformer.h.{i}.attn.bias"] = numpy.tril(numpy.ones((1, 1, n_positions, n_positions), dtype))
        tensors[f"transformer.h.{i}.attn.masked_bias"] = numpy.array(-1e4, dtype=dtype)
    return tensors


def write_gpt2_dir(folder, tensors=None, **config_changes):
    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "n_positions": 12, "n_ctx": 12,
              "vocab_size": 40, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"} | config_changes
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    safetensors.numpy.save_file(gpt2_tensors() if tensors is None else tensors, folder / "model.safetensors",
                                metadata={"format": "pt"})
    return folder


def test_loaded_gpt2_matches_an_independent_forward_from_the_raw_file(tmp_path):
    tensors = gpt2_tensors()
    model, _ = hf.from_pretrained(write_gpt2_dir(tmp_path, tensors), dtype="float64")
    # The Conv1D weights land as stored, (in, out): no transpose for GPT-2's files.
    assert model.params["h.0.attn.c_attn.weight"].shape == (8, 24)
    assert model.params["h.1.mlp.c_fc.weight"].shape == (8, 32)
    assert numpy.array_equal(model.params["h.1.mlp.c_fc.weight"], tensors["transformer.h.1.mlp.c_fc.weight"])
    expected = reference_gpt2_logits(tensors, IDX, n_layer=2, n_head=2)
    numpy.testing.assert_allclose(logits(model), expected, rtol=1e-10, atol=1e-10)


def test_float16_and_float64_files_are_cast_to_the_requested_dtype(tmp_path):
    tensors = {name: array.astype("float16") for name, array in gpt2_tensors().items()}
    model, _ = hf.from_pretrained(write_gpt2_dir(tmp_path, tensors), dtype="float32")
    assert model.params["wte.weight"].dtype == numpy.float32
    assert numpy.array_equal(model.params["wte.weight"], tensors["transformer.wte.weight"].astype("float32"))


# -- the name mapping ----------------------------------------------------------------------------


def test_name_mapping_works_on_gradients_and_skips_buffers():
    model = random_model("float64").train()
    model(IDX, IDX)
    grads = model.backward()
    named = hf.to_hf_state_dict(grads, prefix="transformer.")
    assert set(named) == {"transformer." + name for name in model.params}
    assert named["transformer.h.0.attn.c_attn.weight"] is grads["h.0.attn.c_attn.weight"]  # same array, same layout
    back = hf.from_hf_state_dict(named | {"transformer.h.0.attn.bias": numpy.ones((1, 1, 12, 12))})
    assert back.keys() == grads.keys() and all(back[name] is grads[name] for name in grads)

    tensors = gpt2_tensors()
    params = hf.from_hf_state_dict(tensors)
    assert set(params) == set(random_model().params)  # no lm_head, no mask buffers
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    with pytest.raises(hf.PretrainedError, match="lm_head.weight differs from wte.weight"):
        hf.from_hf_state_dict(tensors)


# -- bad directories: each a one-line PretrainedError ---------------------------------------------


def assert_refused(path, match):
    with pytest.raises(hf.PretrainedError, match=match) as err:
        hf.from_pretrained(path)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_directory_and_config(tmp_path):
    assert_refused(tmp_path / "nowhere", "not a directory")
    assert_refused(tmp_path, r"config.json: no such file")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"n_head": None}, r"config.json: missing key 'n_head'; a GPT-2 config.json has n_layer, n_head"),
        ({"layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon is 1e-06; minillm's LayerNorm uses GPT-2's 1e-05"),
        ({"model_type": "llama"}, r"model_type is 'llama'; only gpt2"),
        ({"activation_function": "relu"}, r"activation_function is 'relu'"),
        ({"n_head": 3}, r"config.json: n_embd \(8\) must be divisible by n_head \(3\)"),
    ],
)
def test_bad_config_is_refused(tmp_path, changes, match):
    assert_refused(write_gpt2_dir(tmp_path, **changes), match)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"scale_attn_weights": False}, r"config.json: scale_attn_weights is false; minillm scales attention by"),
        ({"scale_attn_by_inverse_layer_idx": True}, r"config.json: scale_attn_by_inverse_layer_idx is true"),
        ({"add_cross_attention": True}, r"config.json: add_cross_attention is true; minillm has no cross-attention"),
    ],
)
def test_attention_settings_minillm_does_not_compute_are_refused(tmp_path, changes, match):
    """A GPT-2 config that scales attention otherwise, or adds cross-attention, is refused in one line
    naming the setting, rather than loaded into a model that computes something else; GPT-2's own
    values of the same settings load."""
    assert_refused(write_gpt2_dir(tmp_path / "refused", **changes), match)
    ((key, value),) = changes.items()
    model, _ = hf.from_pretrained(write_gpt2_dir(tmp_path / "gpt2", **{key: not value}), dtype="float64")
    assert model.config.n_layer == 2


def test_config_and_tensors_of_different_shapes(tmp_path):
    assert_refused(write_gpt2_dir(tmp_path, n_embd=16),
                   r"transformer\.wte\.weight has shape \(40, 8\), but config.json makes it \(40, 16\)")


def test_linear_layout_weights_are_refused_by_shape(tmp_path):
    tensors = gpt2_tensors()
    name = "transformer.h.0.mlp.c_fc.weight"
    tensors[name] = numpy.ascontiguousarray(tensors[name].T)  # torch.nn.Linear's (out, in)
    assert_refused(write_gpt2_dir(tmp_path, tensors),
                   r"mlp\.c_fc\.weight has shape \(32, 8\), but config.json makes it \(8, 32\)")


def test_missing_and_unexpected_tensors(tmp_path):
    tensors = gpt2_tensors()
    del tensors["transformer.h.1.ln_2.bias"]
    assert_refused(write_gpt2_dir(tmp_path / "a", tensors), r"has no tensor h\.1\.ln_2\.bias \(1 missing")
    tensors = gpt2_tensors() | {"transformer.h.0.crossattention.c_attn.weight": numpy.zeros((8, 24))}
    assert_refused(write_gpt2_dir(tmp_path / "b", tensors), r"unexpected tensor transformer\.h\.0\.crossattention")


def test_untied_lm_head_is_refused(tmp_path):
    tensors = gpt2_tensors()
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 2
    assert_refused(write_gpt2_dir(tmp_path, tensors), r"lm_head.weight differs from wte.weight")


def test_truncated_safetensors(tmp_path):
    folder = write_gpt2_dir(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_refused(folder, r"model.safetensors: not a readable safetensors file \(.+\); download or save it again")


def test_safetensors_header_claiming_an_absurd_size(tmp_path):
    folder = write_gpt2_dir(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes((2**60).to_bytes(8, "little") + path.read_bytes()[8:])
    assert_refused(folder, r"model.safetensors: not a readable safetensors file")


def test_safetensors_with_a_broken_header(tmp_path):
    folder = write_gpt2_dir(tmp_path)
    header = b'{"wte.weight": {"dtype": "F32", "shape": [40, 8], "data_offsets": [0, 99999]}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(1280))
    assert_refused(folder, r"model.safetensors: not a readable safetensors file")


def test_pickle_file_alone_is_refused(tmp_path):
    folder = write_gpt2_dir(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    message = assert_refused(folder, r"pytorch_model\.bin: a pickle file, which can run any code")
    assert "model.safetensors" in message and "safe_serialization=True" in message
    (folder / "pytorch_model.bin").unlink()
    assert_refused(folder, r"no model\.safetensors")


def test_tokenizer_needs_both_files(tmp_path):
    folder = write_gpt2_dir(tmp_path)
    (folder / "vocab.json").write_text("{}")
    assert_refused(folder, r"has vocab.json but no merges.txt; the tokenizer needs both")


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    folder = write_gpt2_dir(tmp_path)
    BPETokenizer.train("plenty of text for a few merges", 256 + 4).save(folder)
    assert_refused(folder, r"the tokenizer has 260 tokens, more than the model's vocab_size 40")


# -- transformers, where it is installed -----------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_loads_what_save_pretrained_writes(tmp_path, bias):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = random_model("float32", vocab_size=300, bias=bias)
    tokenizer = BPETokenizer.train("Some text, and some more text to learn merges from. " * 3, 256 + 30 + 1)
    hf.save_pretrained(model, tmp_path, tokenizer)
    theirs, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        their_logits = theirs.eval()(torch.as_tensor(IDX)).logits.numpy()
    numpy.testing.assert_allclose(their_logits, logits(model), rtol=1e-4, atol=1e-4)
    their_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    text = "Some text, and more: 日本語 🎉  end"
    assert their_tokenizer(text)["input_ids"] == tokenizer.encode(text)


def test_from_pretrained_reads_what_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=8, n_layer=2, n_head=2)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():  # large random values everywhere, not zero biases and unit gains
            parameter.normal_(0.0, 0.5)
    theirs.save_pretrained(tmp_path)
    model, _ = hf.from_pretrained(tmp_path)
    with torch.no_grad():
        their_logits = theirs(torch.as_tensor(IDX)).logits.numpy()
    numpy.testing.assert_allclose(logits(model), their_logits, rtol=1e-4, atol=1e-4)


def test_a_float64_file_loads_as_float32_with_its_head_still_tied(tmp_path):
    """The tied head is compared in the model's dtype: a float64 file's lm_head equals its wte cast alike."""
    tensors = gpt2_tensors()
    model, _ = hf.from_pretrained(write_gpt2_dir(tmp_path, tensors))
    assert model.dtype == numpy.float32
    assert numpy.array_equal(model.params["wte.weight"], tensors["transformer.wte.weight"].astype(numpy.float32))
