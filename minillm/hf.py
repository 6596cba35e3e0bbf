"""GPT-2 weights in and out, in Hugging Face's directory format, without pickle.

    model, tokenizer = hf.from_pretrained("path/to/gpt2")   # tokenizer None without vocab.json/merges.txt
    hf.save_pretrained(model, "out/gpt2", tokenizer)        # transformers' GPT2LMHeadModel loads it

These functions are the one way in and out: the model knows nothing of Hugging Face, and this
module builds GPT models from what it reads. A directory that cannot be read or written is a
PretrainedError (minillm/errors.py).

A GPT-2 directory, as on the Hugging Face Hub, holds
    config.json              n_layer, n_head, n_embd, n_positions, vocab_size, layer_norm_epsilon, ...
    model.safetensors        the tensors: a JSON header (each tensor's name, dtype, shape and byte
                             range), then the raw numbers. Reading it runs no code. pytorch_model.bin,
                             a pickle, could run any code when read, and is refused.
    vocab.json, merges.txt   the byte-level BPE tokenizer (tokenizers/bpe.py)

Names and layout. minillm's parameters already carry GPT-2's names, and GPT-2's
linear layers (its Conv1D modules) store the weight (in, out), as minillm does:
h.0.attn.c_attn.weight is (C, 3C) in both, h.0.mlp.c_fc.weight (C, 4C), so every
array maps unchanged (no transpose). Only the names may differ, by the prefix
"transformer." that GPT2LMHeadModel's state dict has and the gpt2 safetensors
file on the Hub does not. (Implementations built on torch.nn.Linear, such as
nanoGPT, store (out, in), and need a transpose to compare against these.)
GPT-2's LM head is tied to wte, so lm_head.weight, where a file has it, must
equal wte.weight. Older files also carry h.{i}.attn.bias and h.{i}.attn.masked_bias:
the causal mask, a constant buffer rather than a parameter; they are skipped.
"""

import json
import os
import re
from pathlib import Path

import numpy
import safetensors
import safetensors.numpy

from minillm import backend, files, finetune
from minillm.errors import ConfigError, PretrainedError
from minillm.layers import layernorm
from minillm.model import GPT, GPTConfig, parameter_shapes
from minillm.tokenizers.bpe import BPETokenizer, TokenizerError

PREFIX = "transformer."
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
REQUIRED_CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
# GPT-2's tanh approximation of GELU (layers/gelu.py); transformers has it under both names.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
CONFIG_LIMIT = files.MiB
READABLE_DTYPES = ("F16", "F32", "F64")  # what NumPy can hold and minillm can compute in (after a cast)

# -- names ----------------------------------------------------------------------------------------


def to_hf_state_dict(params, prefix=""):
    """{GPT-2 name: array} for any dict keyed like model.params: parameters, gradients, AdamW moments.

    The arrays themselves, not copies: the layouts agree (see the module docstring).
    prefix="transformer." gives the names of GPT2LMHeadModel.state_dict().
    """
    return {prefix + name: array for name, array in params.items()}


def from_hf_name(hf_name):
    """minillm's name for a GPT-2 tensor name, or None for a tensor that is not a parameter
    (the mask buffers, and lm_head.weight, which is wte.weight again)."""
    name = hf_name.removeprefix(PREFIX)
    if name == "lm_head.weight" or MASK_BUFFER.fullmatch(name):
        return None
    return name


def from_hf_state_dict(tensors):
    """{minillm name: array} from GPT-2 tensors named with or without "transformer.".

    Skips the mask buffers, and checks that lm_head.weight, if present, equals wte.weight.
    """
    params = {name: tensors[hf_name] for name, hf_name in minillm_names(tensors, "the state dict").items()}
    if "lm_head.weight" in tensors:
        check_tied(tensors["lm_head.weight"], params.get("wte.weight"), "the state dict")
    return params


def minillm_names(hf_names, where):
    """{minillm name: GPT-2 name} for the parameters among hf_names (buffers and lm_head skipped)."""
    names = {}
    for hf_name in hf_names:
        name = from_hf_name(hf_name)
        if name is None:
            continue
        if name in names:
            raise PretrainedError(f"{where}: {name} appears twice, as {names[name]} and {hf_name}")
        names[name] = hf_name
    return names


def check_tied(lm_head, wte, where):
    """PretrainedError unless the LM head equals the token embedding, compared in wte's dtype (the model's:
    a float64 file loaded as float32 ties once both are cast alike)."""
    if wte is None or not numpy.array_equal(backend.to_host(lm_head).astype(wte.dtype), backend.to_host(wte)):
        raise PretrainedError(
            f"{where}: lm_head.weight differs from wte.weight; minillm ties the LM head to the token "
            "embedding, as GPT-2 does, so an untied head cannot be loaded"
        )


# -- config.json ----------------------------------------------------------------------------------


def config_from_hf(hf_config, where="config.json"):
    """GPTConfig from a GPT-2 config.json's contents; refuses settings that change GPT-2's computation."""
    if not isinstance(hf_config, dict):
        raise PretrainedError(f"{where}: expected a JSON object, got {type(hf_config).__name__}")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in hf_config]
    if missing:
        raise PretrainedError(
            f"{where}: missing key {missing[0]!r}; a GPT-2 config.json has {', '.join(REQUIRED_CONFIG_KEYS)}"
        )
    for key in REQUIRED_CONFIG_KEYS:
        value = hf_config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PretrainedError(f"{where}: {key} must be a positive integer, got {value!r}")
    get = hf_config.get
    n_embd = hf_config["n_embd"]
    refusals = [
        (get("model_type", "gpt2") != "gpt2", f"model_type is {get('model_type')!r}; only gpt2 models can be read"),
        (get("layer_norm_epsilon", layernorm.EPS) != layernorm.EPS,
         f"layer_norm_epsilon is {get('layer_norm_epsilon')!r}; minillm's LayerNorm uses GPT-2's {layernorm.EPS}"),
        (get("activation_function", "gelu_new") not in GELU_TANH,
         f"activation_function is {get('activation_function')!r}; minillm has GPT-2's gelu_new"),
        (get("n_inner") not in (None, 4 * n_embd), f"n_inner is {get('n_inner')!r}; minillm's MLP is 4 * n_embd wide"),
        (not get("scale_attn_weights", True),
         "scale_attn_weights is false; minillm scales attention by 1/sqrt(head size)"),
        (get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx is true; minillm does not"),
        (get("add_cross_attention", False), "add_cross_attention is true; minillm has no cross-attention"),
    ]
    for refused, reason in refusals:
        if refused:
            raise PretrainedError(f"{where}: {reason}")
    try:
        return GPTConfig(
            vocab_size=hf_config["vocab_size"], block_size=hf_config["n_positions"],
            n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=n_embd,
            # minillm has one dropout rate where GPT-2 has three (usually equal): take the residual one.
            dropout=get("resid_pdrop", 0.0), bias=True,
        )
    except ConfigError as err:
        raise PretrainedError(f"{where}: {err}") from None


def config_to_hf(config, dtype_name, eot_id=None):
    """config.json's contents for a minillm GPTConfig, as transformers' GPT2Config writes them."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": layernorm.EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype_name,
    }


def read_config(path):
    text = files.read_small_text(path, PretrainedError, CONFIG_LIMIT, "a GPT-2 directory's config.json")
    return config_from_hf(files.parse_json(text, path, PretrainedError), path)


# -- loading --------------------------------------------------------------------------------------


def from_pretrained(path, dtype="float32", device="cpu"):
    """(model, tokenizer) from a GPT-2 directory; tokenizer is None without vocab.json and merges.txt.

    The model is in eval mode (dropout off), as transformers returns it; its
    config's dropout is the file's resid_pdrop, used after model.train().
    Tensors stored as float16, float32 or float64 are cast to `dtype`.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise PretrainedError(
            f"{directory}: not a directory; from_pretrained reads a GPT-2 directory "
            "(config.json, model.safetensors, and optionally vocab.json and merges.txt)"
        )
    config = read_config(directory / "config.json")
    weights = weights_file(directory)
    tokenizer = read_tokenizer(directory, config)
    try:
        model = GPT(config, dtype=dtype, device=device)
    except ConfigError as err:
        raise PretrainedError(f"{directory / 'config.json'}: {err}") from None
    read_weights(weights, model)
    return model.eval(), tokenizer


def weights_file(directory):
    """directory/model.safetensors, or a clear refusal of what is there instead."""
    path = directory / "model.safetensors"
    if path.exists() or path.is_symlink():
        files.open_regular(path, PretrainedError, "GPT-2's model.safetensors").close()
        return path
    if (directory / "model.safetensors.index.json").is_file():
        raise PretrainedError(
            f"{directory}: the weights are sharded (model.safetensors.index.json); minillm reads one "
            "model.safetensors file: merge the shards with transformers' save_pretrained(max_shard_size=...)"
        )
    if (directory / "pytorch_model.bin").is_file():
        raise PretrainedError(
            f"{directory / 'pytorch_model.bin'}: a pickle file, which can run any code when it is read, so minillm "
            "does not read it. Get model.safetensors instead: the Hugging Face Hub has it beside pytorch_model.bin "
            "for gpt2, or convert the .bin once, in an environment you trust, with transformers: "
            "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise PretrainedError(f"{directory}: no model.safetensors; a GPT-2 directory has config.json and model.safetensors")


def read_weights(path, model):
    """Copy the tensors of a model.safetensors file into model.params, after checking names, shapes, dtypes.

    The file is opened once for its header (names, shapes, dtypes), then once per
    tensor: the safetensors reader maps the file into memory, and the pages it has
    read stay counted against the process until the file is closed. Reopening keeps
    that to one tensor, so loading needs little more than the model's own memory.
    """
    where = str(path)
    header = safetensors_header(path)
    names = minillm_names(header, where)

    missing = [name for name in model.params if name not in names]
    unexpected = [names[name] for name in names if name not in model.params]
    if missing or unexpected:
        problem = f"has no tensor {missing[0]}" if missing else f"has the unexpected tensor {unexpected[0]}"
        raise PretrainedError(
            f"{where} {problem} ({len(missing)} missing, {len(unexpected)} unexpected); "
            "it does not hold a GPT-2 model of config.json's shape"
        )
    for name in model.params:
        hf_name = names[name]
        shape, dtype = header[hf_name]
        if shape != model.params[name].shape:
            raise PretrainedError(
                f"{where}: {hf_name} has shape {shape}, but config.json makes it {model.params[name].shape}"
            )
        if dtype not in READABLE_DTYPES:
            raise PretrainedError(
                f"{where}: {hf_name} is {dtype}; minillm reads float16, float32 and float64 tensors "
                "(NumPy has no bfloat16): convert the file to float32"
            )

    for name in model.params:  # in the model's order, so the first bad tensor named is the first parameter
        tensor = read_tensor(path, names[name])
        if not numpy.isfinite(tensor).all():
            kind = "a NaN" if numpy.isnan(tensor).any() else "an infinity"
            raise PretrainedError(
                f"{where}: {names[name]} holds {kind}; a model built from it would sample garbage, so the file "
                "is damaged or was saved from a diverged run: download or save it again"
            )
        model.params[name][...] = backend.to_device(tensor, model.device)
    if "lm_head.weight" in header:
        check_tied(read_tensor(path, "lm_head.weight"), model.params["wte.weight"], where)


def safetensors_header(path):
    """{name: (shape, dtype name)} of every tensor in a safetensors file, without reading the data."""
    try:
        with safetensors.safe_open(path, framework="np") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
    except (safetensors.SafetensorError, OSError) as err:
        raise unreadable(path, err) from None


def read_tensor(path, name):
    """One tensor of a safetensors file as a NumPy array; the file is open for this tensor alone."""
    try:
        with safetensors.safe_open(path, framework="np") as f:
            return f.get_tensor(name)
    except (safetensors.SafetensorError, OSError) as err:
        raise unreadable(path, err) from None


def unreadable(path, err):
    return PretrainedError(
        f"{path}: not a readable safetensors file ({str(err).strip() or type(err).__name__}); "
        "download or save it again"
    )


def read_tokenizer(directory, config):
    """The BPE tokenizer of a GPT-2 directory, or None when it has neither vocab.json nor merges.txt."""
    # Anything by these names counts as present: a FIFO or a folder is then refused by name when read.
    present = [name for name in ("vocab.json", "merges.txt")
               if (directory / name).exists() or (directory / name).is_symlink()]
    if not present:
        return None
    if len(present) == 1:
        other = "merges.txt" if present == ["vocab.json"] else "vocab.json"
        raise PretrainedError(f"{directory}: has {present[0]} but no {other}; the tokenizer needs both")
    try:
        tokenizer = BPETokenizer.load(directory)
    except TokenizerError as err:
        raise PretrainedError(str(err)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise PretrainedError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {config.vocab_size} in config.json"
        )
    return tokenizer


# -- saving ---------------------------------------------------------------------------------------


def save_pretrained(model, directory, tokenizer=None):
    """Write config.json, model.safetensors and, for a BPE tokenizer, vocab.json and merges.txt.

    transformers' GPT2LMHeadModel.from_pretrained(directory) loads the result.
    GPT-2 always has biases: a model without them (config.bias False) is written
    with zero biases, which compute the same function, so it loads (as a model
    with biases) with the same logits. LoRA adapters are merged into the weights
    first (GPT-2 has no place for them). Returns the directory as a Path.
    """
    model = finetune.merged(model)
    if tokenizer is not None and not isinstance(tokenizer, BPETokenizer):
        raise PretrainedError(
            f"a {type(tokenizer).__name__} has no GPT-2 file format; pass tokenizer=None to write the model alone"
        )
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise PretrainedError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, "
            f"more than the model's vocab_size {model.config.vocab_size}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    params = {name: backend.to_host(array) for name, array in model.params.items()}
    with_biases = GPTConfig(**{**model.config.to_dict(), "bias": True})
    for name, shape in parameter_shapes(with_biases).items():
        if name not in params:
            params[name] = numpy.zeros(shape, dtype=model.dtype)
    tensors = to_hf_state_dict(params)  # no prefix, as in the gpt2 file on the Hub

    hf_config = config_to_hf(model.config, model.dtype.name, tokenizer.eot_id if tokenizer else None)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    # Write beside the target, then rename: an interrupted save leaves no half-written model.safetensors.
    # transformers requires the "format" entry and reads "pt" as its own layout, which this is.
    target = directory / "model.safetensors"
    partial = directory / ".model.safetensors.partial"
    try:
        safetensors.numpy.save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
