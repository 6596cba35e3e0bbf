"""Every training option: TrainConfig (the defaults are the `baby` preset), the presets, and the checks.

An option's value comes from a flag, a --config file or a saved run's train_config
(minillm/train_cli.py); each is checked here, its type first (field_problem), then
whether it can work with the others (validate). The options that shape the model
(n_layer, n_embd, dropout, lora_rank, ...) are checked by checks.check_config, as
GPTConfig checks itself. A ConfigError names the option as its flag.
"""

import json
import math
from dataclasses import dataclass, fields

from minillm import backend, checks, parallel
from minillm.errors import ConfigError
from minillm.tokenizers.choice import DEFAULT_BPE_VOCAB_SIZE, MAX_BPE_VOCAB_SIZE, MIN_BPE_VOCAB_SIZE


@dataclass
class TrainConfig:
    """Every training option; the defaults are the `baby` preset."""

    data: str = ""  # or, given several files, a list of them
    dataset: str = ""
    sft: str = ""
    tokenizer: str = "char"  # char, bpe, gpt2, or a folder with vocab.json and merges.txt (tokenizers/choice.py)
    vocab_size: int = DEFAULT_BPE_VOCAB_SIZE  # --tokenizer bpe's vocabulary, bytes and <|endoftext|> included
    out_dir: str = "out"
    resume: bool = False
    overwrite: bool = False  # start afresh in an out dir that holds another run
    init_from: str = ""
    extend_vocab: bool = False
    freeze_embeddings: bool = False
    freeze_blocks: int = 0
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_targets: str = "attn"
    merge_lora: bool = False
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: --max-iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    patience: int = 0  # 0: no early stopping
    save_interval: int = 250
    log_interval: int = 50
    log_layers: bool = False  # per parameter group: gradient norm and update/weight ratio at each log line
    sample_tokens: int = 200
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0  # 0: one per CPU core (1 on a GPU)
    reference: bool = False  # run on the reference layers (minillm.layers) instead of the fast ones
    layers_from: str = ""  # a learner's exercises folder: each layer of theirs that passes replaces the reference's
    zero: int = 0  # 1: on several ranks, shard AdamW's moments across them (ZeRO stage 1, minillm/zero.py)


TRAIN_FIELDS = {field.name: field.type for field in fields(TrainConfig)}

PRESETS = {
    # nanoGPT's CPU-sized character model: a few minutes on a laptop.
    "baby": {},
    # nanoGPT's shakespeare-char model, batch 8: wants a fast CPU or a GPU.
    "small": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, dropout=0.2,
        max_iters=5000, eval_interval=500, save_interval=500, eval_iters=50,
    ),
}


def flag(name):
    """An option's name as its command-line flag: lr_decay_iters -> --lr-decay-iters."""
    return "--" + name.replace("_", "-")


def field_problem(name, value):
    """What is wrong with the type of a TrainConfig value (from a flag, a config file or a saved run), or None.

    A bool is not a number here (JSON's true would otherwise train with lr 1.0), and an
    integer is a float's valid value.
    """
    kind = TRAIN_FIELDS.get(name)
    if kind is None:
        return f"unknown option {name!r}"
    if name == "data" and isinstance(value, list):  # --data a.txt b.txt
        if value and all(isinstance(item, str) and item for item in value):
            return None
        return f"--data must be a path or a list of paths, got {shown(value)}"
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    return None if ok else f"{flag(name)} must be {TYPE_WORDS[kind]}, got {shown(value)}"


def shown(value):
    """A value as the JSON or TOML it came from would write it (true, not True), cut short when long."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def validate(cfg):
    """Raise ConfigError naming the first option (as its flag) whose value cannot work.

    The comparisons are written so that NaN fails them too.
    """
    for name in TRAIN_FIELDS:
        problem = field_problem(name, getattr(cfg, name))
        if problem:
            raise ConfigError(problem)
    checks.check_config(vars(cfg), flag)
    positive = ("batch_size", "grad_accum", "eval_interval", "eval_iters", "save_interval", "log_interval")
    non_negative = (
        "max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "min_lr", "weight_decay", "grad_clip",
        "threads", "patience", "freeze_blocks", "seed",
    )
    for name in positive:
        if not getattr(cfg, name) >= 1:
            raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if not 0 <= getattr(cfg, name) < math.inf:
            raise ConfigError(f"{flag(name)} must be 0 or more (and finite), got {getattr(cfg, name)}")
    if not 0 < cfg.lr < math.inf:
        raise ConfigError(f"--lr must be positive and finite, got {cfg.lr}")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}: "
                          "the floor of the decay must not exceed its peak")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{flag(name)} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --out-dir and --overwrite deletes it: give one of them")
    if cfg.threads > parallel.MAX_THREADS:
        raise ConfigError(f"--threads must be at most {parallel.MAX_THREADS}, got {cfg.threads} (0: one per core)")
    if not cfg.out_dir:
        raise ConfigError("--out-dir is empty: name a folder (default: out)")
    if not MIN_BPE_VOCAB_SIZE <= cfg.vocab_size <= MAX_BPE_VOCAB_SIZE:
        raise ConfigError(f"--vocab-size must be from {MIN_BPE_VOCAB_SIZE} (the 256 bytes and <|endoftext|>) to "
                          f"{MAX_BPE_VOCAB_SIZE:,}, got {cfg.vocab_size}")
    if not cfg.tokenizer:
        raise ConfigError("--tokenizer is empty: give char, bpe, gpt2 or a folder (default: char)")
    if cfg.tokenizer != "char" and cfg.init_from:
        raise ConfigError(f"--tokenizer {cfg.tokenizer}: a run from --init-from keeps the tokenizer of its model "
                          "(the token ids must mean what they meant): leave --tokenizer out")
    if sum(map(bool, (cfg.data, cfg.dataset, cfg.sft))) > 1:
        raise ConfigError("--data, --dataset and --sft name different training data: give one of them")
    fine_tuning = ("extend_vocab", "freeze_embeddings", "freeze_blocks", "lora_rank", "merge_lora")
    for name in fine_tuning:
        if getattr(cfg, name) and not cfg.init_from:
            raise ConfigError(f"{flag(name)} fine-tunes a pretrained model: give --init-from too")
    if cfg.extend_vocab and (cfg.freeze_embeddings or cfg.lora_rank):
        raise ConfigError("--extend-vocab adds embedding rows that must train: "
                          "leave out --freeze-embeddings and --lora-rank")
    if cfg.merge_lora and not cfg.lora_rank:
        raise ConfigError("--merge-lora merges LoRA adapters: give --lora-rank too")
    if cfg.zero not in (0, 1):
        raise ConfigError(f"--zero must be 0 (off) or 1 (AdamW's moments sharded across the ranks), got {cfg.zero}")
    backend.dtype_of(cfg.dtype)
