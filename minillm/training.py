"""Training: data -> model -> loss -> backward -> AdamW, with evaluation, logs and checkpoints.

Pretraining and fine-tuning share this loop. Each step averages the gradients of
`grad_accum` micro-batches (each the mean over its own counted targets), clips
them by global norm, and takes one AdamW step at the warmup + cosine learning rate.

Fine-tuning starts from --init-from (a checkpoint or a GPT-2 directory) with a
fresh optimizer and schedule, and may
    freeze the embeddings (and so the tied LM head) or the first k blocks,
    train LoRA adapters instead of the weights (--lora-rank; --merge-lora also
        writes merged.npz, the best checkpoint with the adapters folded in),
    learn from prompt/completion pairs with the loss on completions only (--sft),
    stop early after --patience evaluations without a better validation loss.
Frozen parameters get no optimizer state.

One step is train_step, first below: the whole of training in miniature. The rest
of the module is the loop around it: setup, the loop itself, and the finish.
Started by mpiexec, each process is one rank of a data-parallel job: it takes its
share of every batch, the ranks sum their gradients, and rank 0 alone prints and
writes (minillm/distributed.py; --zero 1: minillm/zero.py).

Randomness is counter-based: the batches and the dropout masks of step k come
from generators seeded with (seed, k). Resuming at step k therefore needs no saved
generator state, and a resumed run repeats an uninterrupted one exactly.

The out dir holds:
    ckpt.npz     the best model so far (lowest validation loss)
    last.npz     the latest state, for --resume (parameters, AdamW moments, step)
    merged.npz   with --merge-lora: ckpt.npz with its adapters merged
    train.bin, val.bin   the token files, described by tokens.json, their tokenizer in tokenizer.json
                 (minillm/prepare.py): a later run on the same text and tokenizer reuses them
    log.jsonl    one JSON object per progress line and per evaluation
    loss.png     the loss curves (when matplotlib is installed)
    layers.png   with --log-layers: each parameter group's gradient norm and update/weight ratio
                 (minillm/health.py), which the progress lines of log.jsonl then also hold
"""

import _thread
import contextlib
import math
import os
import signal
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy
from threadpoolctl import threadpool_limits

from minillm import backend, checkpoint, data, distributed, evaluate, finetune, memory, parallel, prepare, sft, system
from minillm.corpus import Corpus
from minillm.errors import ConfigError
from minillm.health import PLOT_FILE as LAYERS_PLOT_FILE, LayerWatch, plot_layers
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW, clip_grad_norm, cosine_lr
from minillm.options import TRAIN_FIELDS, TrainConfig, flag, shown, validate
from minillm.progress import LOG_FILE, PLOT_FILE, NoProgress, OutlivedStdout, Progress, plot_losses
from minillm.readback import NonfiniteWatch, StepClock, TrainingError
from minillm.sampling import encode_prompt, generate
from minillm.tokenizers.char import CharTokenizer, UnknownCharactersError
from minillm.tokenizers.choice import choose as choose_tokenizer
from minillm.zero import ShardedAdamW, ZeroRanks

BEST_CHECKPOINT = "ckpt.npz"
LAST_CHECKPOINT = "last.npz"
MERGED_CHECKPOINT = "merged.npz"
HELD_OUT_SHOWN = 3
RUN_FILES = (BEST_CHECKPOINT, LAST_CHECKPOINT, MERGED_CHECKPOINT, LOG_FILE, PLOT_FILE,
             LAYERS_PLOT_FILE)  # --overwrite deletes

# Independent random streams, each seeded with (seed, stream, step).
BATCH_STREAM, DROPOUT_STREAM, EVAL_STREAM, SAMPLE_STREAM = range(4)


def train_step(model, optimizer, batch, step, cfg, watch, ranks=distributed.SINGLE_PROCESS, layer_watch=None):
    """One optimizer step; returns (mean loss, gradient norm before clipping, tokens).

    `batch(rng)` draws a micro-batch (idx, targets) of this rank's rows; `model` is a GPT or a
    parallel.ShardedGPT (the batch split across threads); `watch` is a NonfiniteWatch. `ranks` is
    the job this process is one rank of: a distributed.World (SINGLE_PROCESS: this process only), or a
    zero.ZeroRanks under --zero 1. `layer_watch`, a health.LayerWatch (--log-layers, on logged
    steps), measures the update without changing a number.
    """
    keys = (step, *ranks.stream_keys)  # several ranks: (step, rank), so each draws its own rows and masks
    batch_rng = stream_rng(cfg.seed, BATCH_STREAM, *keys)
    micro_batches = [batch(batch_rng) for _ in range(cfg.grad_accum)]
    # Each micro-batch's share of the step (1/grad_accum alone), and the step's tokens on all ranks.
    weights, tokens = ranks.micro_batch_weights(micro_batches)
    dropout_seeds = [stream_seed(cfg.seed, DROPOUT_STREAM, *keys, micro) for micro in range(cfg.grad_accum)]
    loss, grads = loss_and_gradients(model, micro_batches, weights, dropout_seeds)
    loss, grads = ranks.sum_gradients(loss, grads)  # one allreduce over the ranks (none alone)
    grad_norm = clip_grad_norm(grads, cfg.grad_clip, ranks.across_shards)
    watch.step_done(step, loss, grad_norm, grads)  # a non-finite step stops here, before its update
    if layer_watch is not None:
        layer_watch.before_update(grads)
    optimizer.step(grads, lr=learning_rate(step, cfg))
    if layer_watch is not None:
        layer_watch.after_update(grads)
    return loss, grad_norm, tokens


def loss_and_gradients(model, micro_batches, weights, dropout_seeds):
    """(loss, gradients) of this rank's micro-batches: the sum of weight * (mean loss, gradients) over them.

    Each micro-batch takes its forward then its backward pass (parallel.forward_backward), with
    the dropout masks of its own seed.
    """
    loss, grads = 0.0, None
    for (idx, targets), weight, seed in zip(micro_batches, weights, dropout_seeds):
        model.reseed(seed)
        micro_loss, micro_grads = parallel.forward_backward(model, idx, targets)
        grads = add_gradients(grads, micro_grads, weight)
        loss = loss + weight * micro_loss
    return loss, grads


def add_gradients(total, grads, weight=1.0):
    """total + weight * grads, added into total's arrays (total None: weight * grads, in grads' arrays)."""
    for name, g in grads.items():
        if weight != 1.0:
            g *= weight
        if total is not None:
            total[name] += g
    return grads if total is None else total


def learning_rate(step, cfg):
    """The step's learning rate: linear warmup, then cosine decay to --min-lr."""
    return cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters)


def stream_rng(seed, stream, *keys):
    """A NumPy generator for one (stream, step, ...): the same numbers on every run and resume."""
    return numpy.random.default_rng([seed, stream, *keys])


def stream_seed(seed, stream, *keys):
    """An integer seed for one (stream, step, ...), for generators on the model's device."""
    return int(numpy.random.SeedSequence([seed, stream, *keys]).generate_state(1)[0])


def check_memory(cfg, model):
    """ConfigError, before the batches are drawn, when a training step of these options cannot fit in memory:
    the parameters, their gradients and AdamW moments, one micro-batch's activations, the fixed
    evaluation batches and the final sample's tokens."""
    itemsize = model.dtype.itemsize
    config = model.config
    int64 = 8
    need = (
        4 * model.num_params() * itemsize
        + memory.forward_bytes(config, cfg.batch_size, cfg.block_size, itemsize)
        + 2 * cfg.eval_iters * 2 * cfg.batch_size * (cfg.block_size + 1) * int64
        + (cfg.sample_tokens + 1) * int64
    )
    memory.check_fits(
        need, f"training with --batch-size {cfg.batch_size}, --block-size {cfg.block_size}, "
        f"--eval-iters {cfg.eval_iters} and --sample-tokens {cfg.sample_tokens} on a model of "
        f"{model.num_params():,} parameters",
        "lower --batch-size, --eval-iters or --sample-tokens, or choose a smaller model",
    )


def load_corpus(cfg):
    """(corpus, examples) of the data the options name; the built-in corpus by default.

    examples are --sft's (line, prompt, completion)s, and the corpus then all their text; else None.
    """
    if cfg.sft:
        examples, description = sft.load_examples(cfg.sft)
        return Corpus.from_text(description, sft.corpus_text(examples)), examples
    if cfg.dataset:
        path = data.fetch_dataset(cfg.dataset)
        return Corpus(f"{cfg.dataset} ({path})", paths=[path]), None
    if cfg.data:
        return Corpus.from_paths(cfg.data), None
    return Corpus.from_text("built-in (Python documentation topics)", data.builtin_corpus()), None


def prepare_batches(cfg, corpus, examples, choice, out_dir):
    """(tokenizer, train split, val split, what they hold, batch(split, rng, rows=--batch-size) -> (x, y)) for
    the corpus or --sft examples, under `choice` (a tokenizer, or a Recipe that makes one from the corpus).
    With out_dir None the token files are kept in memory, not written."""
    if examples is None:
        prepared = prepare.prepare(corpus, choice, cfg.block_size, out_dir)
        return prepared.tokenizer, prepared.train, prepared.val, prepared.summary(out_dir), \
            lambda split, rng, rows=cfg.batch_size: data.get_batch(split, rows, cfg.block_size, rng)
    tokenizer = prepare.made_from(choice, corpus)
    train_split, val_split = sft.prepare_splits(examples, tokenizer, cfg.block_size, cfg.sft)
    summary = f"{len(train_split):,} train and {len(val_split):,} val prompt/completion pairs; " \
        f"tokenizer {tokenizer.kind}, {tokenizer.vocab_size:,} tokens"
    return tokenizer, train_split, val_split, summary, \
        lambda split, rng, rows=cfg.batch_size: sft.get_batch(split, rows, rng)


def sample_text(model, tokenizer, n_tokens, seed):
    """A sample that starts from a newline (or token 0 when the vocabulary has none)."""
    start = encode_prompt(tokenizer, "")
    ids = generate(model, numpy.array([start]), n_tokens, temperature=0.8, seed=seed)
    return tokenizer.decode(backend.to_host(ids)[0, len(start):])


def show_samples(run, model, n_tokens, seed):
    """How the model is doing, in indented lines for the terminal ("" when n_tokens is 0).

    For --sft, its greedy answers to a few held-out prompts beside the expected ones;
    otherwise a sample of n_tokens from a newline, as raw text.
    """
    if n_tokens == 0:
        return ""
    if not run.held_out:
        return textwrap.indent(sample_text(model, run.tokenizer, n_tokens, seed), "    ", lambda line: True)
    prompts, expected = zip(*run.held_out)
    most = max(len(run.tokenizer.encode(completion)) for completion in expected) + 1
    given = evaluate.answers(model, run.tokenizer, prompts, min(n_tokens, most))
    return "\n".join(f"    {p!r} -> {g!r} (expected {e!r})" for p, g, e in zip(prompts, given, expected))


def frozen_names(model, cfg):
    """The parameters that do not train: with LoRA adapters every one but them; the embeddings
    (wte, which is also the LM head, and wpe) with --freeze-embeddings; the first k blocks' with --freeze-blocks k."""
    n_layer = model.config.n_layer
    if cfg.freeze_blocks > n_layer:
        raise ConfigError(f"--freeze-blocks {cfg.freeze_blocks} exceeds the model's {n_layer} blocks")
    in_frozen_block = lambda name: name.startswith("h.") and int(name.split(".")[1]) < cfg.freeze_blocks
    is_adapter = lambda name: name.endswith((".lora_a", ".lora_b"))
    frozen = {
        name for name in model.params
        if (model.config.lora_rank and not is_adapter(name)) or in_frozen_block(name)
        or (cfg.freeze_embeddings and name in ("wte.weight", "wpe.weight"))
    }
    if frozen == set(model.params):
        raise ConfigError("the freeze options leave no parameter to train; freeze fewer blocks")
    return frozen


def load_learner_layers(cfg):
    """--layers-from: the learner's layers and AdamW update (minillm.exercises.learner_layers), announced
    in one line; None without the option."""
    if not cfg.layers_from:
        return None
    from minillm.exercises import ExerciseError, learner_layers  # this option alone needs it: a plain run skips it

    try:
        found = learner_layers(cfg.layers_from)
    except ExerciseError as err:
        raise ConfigError(f"--layers-from: {err}") from None
    reasons = ", ".join(f"{name} ({reason.split(':')[0]})" for name, reason in found.not_used.items())
    print(f"layers from {cfg.layers_from}: yours: {', '.join(found.theirs) or 'none'}; "
          f"the reference's: {reasons or 'none'}")
    return found


def build_or_resume(cfg, tokenizer, device, resumed, pretrained, world=distributed.SINGLE_PROCESS, learner=None):
    """(model, optimizer, start step, best val loss, evaluations since the best): fresh, from
    pretrained weights, or from last.npz.

    A pretrained model keeps its own shape (the model options are ignored) and
    trains with windows of --block-size tokens, at most its context; it starts
    with a fresh optimizer and schedule, and with fresh LoRA adapters when asked.
    `learner` (--layers-from) replaces the layers and AdamW update of the reference path.
    """
    model_config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
    )
    if resumed is None:
        if pretrained is None:
            model = GPT(model_config, seed=cfg.seed, dtype=cfg.dtype, device=device, reference=cfg.reference)
        else:
            model = pretrained[0].train()
            model.config.dropout = cfg.dropout
            if cfg.block_size > model.config.block_size:
                raise ConfigError(
                    f"--block-size {cfg.block_size} exceeds the pretrained model's {model.config.block_size} positions"
                )
            if model.dtype != backend.dtype_of(cfg.dtype):
                raise ConfigError(f"{cfg.init_from} holds {model.dtype} parameters; use --dtype {model.dtype}")
            if cfg.lora_rank:
                if model.config.lora_rank:
                    raise ConfigError(f"{cfg.init_from} already has LoRA adapters; fine-tune its merged.npz instead")
                model = finetune.with_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
        start_step, best_val, since_best, optimizer_state = 0, math.inf, 0, None
    else:
        model, _, meta, optimizer_state = resumed
        if not cfg.init_from and model.config != model_config:
            saved, given = model.config.to_dict(), model_config.to_dict()
            differing = ", ".join(f"{flag(name) if name in TRAIN_FIELDS else name} {shown(saved.get(name))} saved, "
                                  f"{shown(given.get(name))} given"
                                  for name in sorted(saved.keys() | given.keys()) if saved.get(name) != given.get(name))
            raise ConfigError(
                f"the checkpoint's model differs from the options given ({differing}); "
                "resume with the options of that run"
            )
        if model.dtype != backend.dtype_of(cfg.dtype):
            raise ConfigError(f"the checkpoint holds {model.dtype} parameters; resume with --dtype {model.dtype}")
        start_step, best_val, since_best = resume_point(meta)
    model.reference = cfg.reference
    model.frozen = frozen_names(model, cfg)
    options = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, reference=cfg.reference)
    if learner:  # the learner's layers and AdamW update where theirs pass, the reference's (not the fast) elsewhere
        model.layers = learner.layers
        options.update(reference=True, update=learner.adamw_update)
    if cfg.zero and world.size > 1:
        optimizer = ShardedAdamW(model, world, **options)
    else:
        optimizer = AdamW(model.trainable_params(), **options)
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except ValueError as err:
            raise ConfigError(f"{LAST_CHECKPOINT}: {err}; "
                              "resume with the freeze and LoRA options of that run") from None
    return model, optimizer, start_step, best_val, since_best


def resume_point(meta):
    """(step, best val loss, evaluations since the best) of a last.npz, each checked."""
    where = f"{LAST_CHECKPOINT}: meta.json"
    step, since_best, best_val = meta.get("step"), meta.get("evals_since_best", 0), meta.get("best_val_loss")
    for name, value in (("step", step), ("evals_since_best", since_best)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise checkpoint.CheckpointError(f"{where}: {name} must be a whole number of 0 or more, got {value!r}")
    if isinstance(best_val, bool) or not isinstance(best_val, (int, float)) or math.isnan(best_val):
        raise checkpoint.CheckpointError(f"{where}: best_val_loss must be a number, got {best_val!r}")
    return step, best_val, since_best


# Options that the machine decides: a --resume takes them from the machine it runs on (or from its flags),
# not from the saved run, whose machine may have had other cores or a GPU, or been one of several ranks.
MACHINE_OPTIONS = ("threads", "device")


def saved_options(cfg):
    """The train_config a checkpoint keeps: every option but the machine's (MACHINE_OPTIONS)."""
    return {name: value for name, value in asdict(cfg).items() if name not in MACHINE_OPTIONS}


@dataclass
class Run:
    """A training run once set up: what the loop works on and what it keeps track of."""

    cfg: TrainConfig
    world: distributed.World  # the ranks of the job (SINGLE_PROCESS: this process only)
    device: str
    out_dir: Path
    tokenizer: object
    model: GPT
    optimizer: AdamW
    batch: object  # batch(split, rng) -> (idx, targets)
    train_split: object
    eval_batches: dict  # "train" / "val" -> fixed batches
    held_out: list  # --sft: (prompt, completion) pairs whose answers each evaluation shows
    step: int  # the next step to take
    best_val: float
    since_best: int  # evaluations since the best val loss

    @property
    def best_path(self):
        return self.out_dir / BEST_CHECKPOINT

    @property
    def last_path(self):
        return self.out_dir / LAST_CHECKPOINT

    @property
    def ranks(self):
        """The world as train_step sees it: with --zero 1 the optimizer keeps a part of each gradient."""
        return ZeroRanks(self.world, self.optimizer) if isinstance(self.optimizer, ShardedAdamW) else self.world

    def save(self, path, **extra):
        """Write a checkpoint from rank 0; every rank must call this (with --zero 1 the moments are gathered)."""
        optimizer_state = self.optimizer.state_dict()
        if not self.world.is_main:
            return
        with ctrl_c_after_writing():
            checkpoint.save(
                path, self.model, self.tokenizer, optimizer_state=optimizer_state, step=self.step,
                best_val_loss=self.best_val, evals_since_best=self.since_best, train_config=saved_options(self.cfg),
                ran_on={name: getattr(self.cfg, name) for name in MACHINE_OPTIONS} | {"device": self.device}, **extra,
            )


# A non-finite loss or gradient is caught and reported with its step (and, on the CPU, its layer);
# NumPy's overflow warnings would only say the same thing earlier and less clearly.
@numpy.errstate(over="ignore", invalid="ignore")
def train(cfg):
    """Run training as configured; returns the best model (reloaded from its checkpoint), or None
    when Ctrl-C stopped it (the state is saved for --resume); on the ranks other than rank 0,
    their model as trained.

    Started by mpiexec, this process is one rank of a data-parallel job (minillm/distributed.py).
    """
    world = distributed.join()
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(ctrl_c_never_swallowed())
        cleanup.enter_context(outliving_the_terminal())
        if not world.is_main:  # only rank 0 prints
            devnull = cleanup.enter_context(open(os.devnull, "w", encoding="utf-8"))
            cleanup.enter_context(contextlib.redirect_stdout(devnull))
        # Every rank sets up; if that fails on any of them, all stop (the first failed rank says why).
        undo = UndoFailedStart()
        cfg, run = world.stop_all_if_any_fails(lambda: start(cfg, world, cleanup, undo))
        if isinstance(run, GPT):  # a --resume of a run already complete: nothing to train
            undo.disarm()
            return run
        if run.device == "cuda":
            world.connect_gpus()
        started = time.perf_counter()
        start_step = run.step
        progress = Progress(cfg, start_step, run.out_dir) if world.is_main else NoProgress()
        undo.disarm()  # from here on, a failed run keeps what it wrote (its checkpoints, its log)
        try:
            with ctrl_c_requests_stop() as stop_requested:
                outcome = loop(run, progress, stop_requested)
        except TrainingError as err:  # a non-finite step: every rank saw the same summed numbers
            err.every_rank, err.reported_elsewhere = True, not world.is_main
            raise
        finally:
            progress.close()
        if outcome is None:
            return None
        if not world.is_main:
            return run.model  # rank 0 alone reloads the best checkpoint and reports
        return finish(run, start_step, time.perf_counter() - started, progress.log_path, *outcome)


def start(cfg, world, cleanup, undo=None):
    """(cfg with its thread count settled, the Run set up): the out dir prepared and locked (by rank 0,
    the lock held until `cleanup` closes), the data, model and optimizer ready.

    If the run fails before `undo` (an UndoFailedStart) is disarmed, what this start created in the out
    dir goes when `cleanup` closes: the out dir itself when it made it, else the files it added."""
    validate(cfg)
    device = backend.resolve_device(cfg.device)
    if world.comm is not None:
        if device == "cuda":
            world.take_gpu()
        world.rows(cfg.batch_size)  # fails here, before anything is written, when the batch cannot be split
        if cfg.log_layers and cfg.zero and world.size > 1:
            raise ConfigError("--log-layers measures whole gradients, and with --zero 1 each rank holds a part "
                              "of them: leave one of the two out")
    if cfg.zero and world.size == 1:
        print("note: --zero 1 shards the optimizer state across processes; this run has one, so it has nothing to "
              "shard (start several with mpiexec -n N)")
    # A concrete thread count, saved with the run: the dropout masks depend on how the batch is split.
    cores = world.cores(system.usable_cores())
    cfg = replace(cfg, threads=cfg.threads or (cores if device == "cpu" else 1))
    if world.comm is not None and device == "cpu":
        # One rank's matrix products use its share of the cores, not every core of the machine.
        cleanup.enter_context(threadpool_limits(limits=cores, user_api="blas"))
    out_dir = Path(cfg.out_dir)
    if world.is_main:
        if undo is not None:
            undo.before_mkdir(out_dir)
            cleanup.push(undo)  # pushed before the lock: it runs after the lock (and its file) is gone
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise checkpoint.CheckpointError(f"cannot create the out dir {out_dir}: {err.strerror}") from None
    system.keep_freed_memory()
    if world.is_main:
        cleanup.enter_context(checkpoint.exclusive(out_dir))
        if undo is not None:
            undo.after_lock()  # only now: until the lock is ours, another run may be adding its files
        # Before anything is written: a refused run leaves the out dir as it was (the lock file goes too).
        refuse_another_run(cfg, out_dir)
    run = setup(cfg, device, out_dir, world)
    if world.is_main:
        # Only once the setup succeeded: a start that fails leaves the out dir's earlier files as they were.
        checkpoint.remove_unfinished_writes(out_dir, RUN_FILES + prepare.PREPARED_FILES)
        if cfg.overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
    return cfg, run


class UndoFailedStart:
    """An exit callback (for ExitStack.push) that removes what a run failing before its first step created
    in its out dir: the out dir, with the folders above it that its creation made, when the run made it;
    otherwise the files that appeared in it after the lock was taken. What was there before stays.
    Does nothing once disarmed, or when the block ends without an error."""

    def __init__(self):
        self.out_dir, self.made, self.before, self.armed = None, [], None, True

    def before_mkdir(self, out_dir):
        """Note the folders, out_dir and those above it, that creating out_dir will make."""
        self.out_dir, folder = Path(out_dir), Path(os.path.abspath(out_dir))
        while not os.path.lexists(folder) and folder != folder.parent:
            self.made.append(folder)  # deepest first
            folder = folder.parent

    def after_lock(self):
        """Note what the out dir holds once the lock is ours (the lock file included)."""
        self.before = set(os.listdir(self.out_dir))

    def disarm(self):
        self.armed = False

    def __call__(self, exc_type, exc, tb):
        if exc_type is None or not self.armed or self.out_dir is None:
            return False
        self.armed = False
        if self.before is not None:  # the lock was ours: the new files are this run's
            try:
                names = set(os.listdir(self.out_dir)) - self.before - {checkpoint.LOCK_FILE}
            except OSError:
                names = set()
            for name in names:
                path = self.out_dir / name
                if path.is_symlink() or not path.is_dir():
                    with contextlib.suppress(OSError):
                        path.unlink()
        for folder in self.made:  # deepest first; a folder that is not empty stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        return False  # the error goes on


def refuse_another_run(cfg, out_dir):
    """Raise ConfigError when a new run would replace the checkpoints of another run in out_dir."""
    if cfg.resume or cfg.overwrite:
        return
    found = [name for name in (BEST_CHECKPOINT, LAST_CHECKPOINT) if (out_dir / name).exists()]
    if found:
        raise ConfigError(
            f"--out-dir {out_dir} holds another run ({' and '.join(found)}): continue it with --resume, "
            "train this run into another folder with --out-dir DIR, or delete that run's checkpoints and log "
            "with --overwrite"
        )


def announce_and_extend_pretrained(cfg, model, tokenizer, corpus):
    """Print what --init-from loaded; with --extend-vocab, add the corpus's new characters as tokens.

    Returns (model, tokenizer)."""
    shape = model.config
    print(f"init from {cfg.init_from}: {shape.n_layer} layers, {shape.n_head} heads, {shape.n_embd} channels, "
          f"context {shape.block_size}, {model.num_params():,} parameters, {tokenizer.kind} vocabulary of "
          f"{tokenizer.vocab_size}")
    if not cfg.extend_vocab:
        return model, tokenizer
    if not isinstance(tokenizer, CharTokenizer):
        raise ConfigError(f"--extend-vocab adds characters to a character vocabulary; {cfg.init_from} has a "
                          f"{tokenizer.kind} one, which encodes any text: leave the option out")
    characters = {chr(codepoint) for codepoint in corpus.scan(prepare.separator_for(tokenizer)).codepoints}
    model, tokenizer, added = extend_vocabulary(model, tokenizer, characters, cfg.seed)
    shown = ", ".join(map(repr, added[:10])) + (f" and {len(added) - 10} more" if len(added) > 10 else "")
    print(f"vocabulary extended by {len(added)} characters" + (f": {shown}" if added else ""))
    return model, tokenizer


def extend_vocabulary(model, tokenizer, characters, seed):
    """(model, tokenizer, the new characters): the characters the vocabulary lacks added as new tokens.

    Each new character gets the next id and a new row of wte, drawn as GPT-2 draws
    the others, N(0, 0.02^2). The old rows stay as they were, so the old tokens'
    logits (x @ wte^T, one column per row) are unchanged until training moves them.
    """
    added = sorted(set(characters) - tokenizer.ids.keys())
    rows = backend.RNG(seed, model.device).normal((len(added), model.config.n_embd), 0.02, model.dtype)
    params = {**model.params, "wte.weight": model.xp.concatenate([model.params["wte.weight"], rows])}
    config = replace(model.config, vocab_size=model.config.vocab_size + len(added))
    extended = GPT(config, seed=seed, dtype=model.dtype.name, device=model.device, params=params)
    return extended, CharTokenizer(tokenizer.chars + added), added


def setup(cfg, device, out_dir, world=distributed.SINGLE_PROCESS):
    """The Run of these options: its data, tokenizer, model and optimizer, fresh, pretrained or resumed
    (for a resumed run already complete, its model: nothing to train).

    Only rank 0 writes the token files; the other ranks keep theirs in memory."""
    corpus, examples = load_corpus(cfg)
    resumed = checkpoint.load(out_dir / LAST_CHECKPOINT, device=device) if cfg.resume else None
    pretrained = checkpoint.load_pretrained(cfg.init_from, device, cfg.dtype) if cfg.init_from and not resumed else None
    if pretrained:
        pretrained = announce_and_extend_pretrained(cfg, *pretrained, corpus)
    learner = load_learner_layers(cfg)  # before the token files are written: a wrong folder stops the run here
    # A resumed or pretrained model keeps its vocabulary: the token ids must mean what they meant.
    choice = resumed[1] if resumed else pretrained[1] if pretrained else choose_tokenizer(cfg.tokenizer, cfg.vocab_size)
    try:
        tokenizer, train_split, val_split, data_summary, batch = prepare_batches(
            cfg, corpus, examples, choice, out_dir if world.is_main else None
        )
    except UnknownCharactersError as err:
        if not pretrained:
            raise
        raise UnknownCharactersError(f"{err}; --extend-vocab adds them to the model as new tokens") from None
    model, optimizer, start_step, best_val, since_best = build_or_resume(cfg, tokenizer, device, resumed, pretrained,
                                                                         world, learner)
    if resumed and start_step >= cfg.max_iters:  # nothing to train: say so before any evaluation
        print(f"the run in {out_dir} is complete at step {start_step} (--max-iters {cfg.max_iters}); to train it "
              f"further, resume with a larger --max-iters, for example --resume --max-iters {2 * start_step or 1}")
        done = out_dir / BEST_CHECKPOINT
        return checkpoint.load(done, device=device)[0] if done.exists() else model  # as a finished run returns it
    if resumed and not (out_dir / BEST_CHECKPOINT).exists():
        print(f"note: {out_dir / BEST_CHECKPOINT} is missing; the next evaluation writes a new one")
        best_val, since_best = math.inf, 0
    check_memory(cfg, model)

    # --sft: the evaluations show the model's answers to these held-out prompts.
    held_out = [(prompt, completion) for _, prompt, completion in examples[-len(val_split):][:HELD_OUT_SHOWN]] \
        if examples else []
    eval_rng = stream_rng(cfg.seed, EVAL_STREAM, 0)
    # The same evaluation batches every time, so successive evaluations are comparable.
    eval_batches = {
        name: [batch(split, eval_rng) for _ in range(cfg.eval_iters)]
        for name, split in (("train", train_split), ("val", val_split))
    }
    trainable = sum(int(p.size) for p in model.trainable_params().values())
    sharded = isinstance(optimizer, ShardedAdamW)
    adamw_mib = 2 * trainable * model.dtype.itemsize / 2**20 / (world.size if sharded else 1)
    ranks = (f"{world.size} processes share" if world.size > 1 else "1 process takes") + \
        f" each batch of {cfg.batch_size} rows ({world.rows(cfg.batch_size)} on rank 0); gradients summed through " \
        f"{world.gradient_path.upper()}" + (", AdamW state sharded (--zero 1)" if sharded else "")
    print(
        f"corpus: {corpus.name}, {data_summary}\n"
        + (f"ranks: {ranks}\n" if world.comm else "")
        + f"model: {model.num_params():,} parameters, {trainable:,} trainable "
        f"(AdamW state {adamw_mib:.2f} MiB" + (" per rank" if sharded else "") + f"), on {device}"
        + (" (CuPy is installed but sees no CUDA GPU)" if backend.auto_missed_a_gpu(cfg.device, device) else "") + " "
        f"({cfg.dtype}, {cfg.threads} thread{'' if cfg.threads == 1 else 's'}"
        + (", reference layers" if cfg.reference else "") + ")"
        + (f"; resuming at step {start_step}" if start_step else "")
    )
    return Run(cfg, world, device, out_dir, tokenizer, model, optimizer, batch, train_split, eval_batches, held_out,
               start_step, best_val, since_best)


@contextlib.contextmanager
def outliving_the_terminal():
    """Within the block, a reader of standard output that goes away (`train.py | head`, a closed terminal
    window or SSH session) ends the printed lines, not the run: the rest of the output is dropped, and the
    checkpoints and log.jsonl are written as ever. SIGHUP, which a closed terminal sends, is ignored (as
    `nohup` does)."""
    stdout = sys.stdout
    if stdout is not None:
        sys.stdout = OutlivedStdout(stdout)
    hangup = getattr(signal, "SIGHUP", None)  # Windows has none
    previous_hangup = signal.signal(hangup, signal.SIG_IGN) if hangup else None
    try:
        yield
    finally:
        if hangup:
            signal.signal(hangup, previous_hangup)
        if stdout is not None:
            sys.stdout.flush()  # what is still buffered, while a reader that went away is still forgiven
            sys.stdout = stdout


@contextlib.contextmanager
def ctrl_c_requests_stop():
    """Within the block, a first Ctrl-C sets the yielded flag (stop_requested[0]); a second stops at once."""
    stop_requested = [False]

    def request_stop(signum, frame):
        stop_requested[0] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop_requested
    finally:
        signal.signal(signal.SIGINT, previous_handler)


@contextlib.contextmanager
def ctrl_c_never_swallowed():
    """Within the block, a Ctrl-C that lands in a finalizer (__del__), a garbage-collector or weakref callback,
    or any other place where Python swallows exceptions acts as a Ctrl-C pressed just after it; one not yet
    acted on when the block ends (without an error) is raised there.

    There its KeyboardInterrupt cannot propagate: Python prints "Exception ignored in ..." (sys.unraisablehook)
    and goes on, so a second Ctrl-C meant to stop at once would be lost and training would carry on. Every
    other exception that Python swallows goes to the hook that was in place.
    """
    previous_hook = sys.unraisablehook
    owed = []  # Ctrl-Cs swallowed and not yet pressed again; list.append and list.pop are atomic

    def press_an_owed_ctrl_c():
        try:
            owed.pop()
        except IndexError:  # the block has ended and raised it
            return
        _thread.interrupt_main(signal.SIGINT)

    def press_ctrl_c_again(unraisable):
        try:
            if not issubclass(unraisable.exc_type, KeyboardInterrupt):
                return previous_hook(unraisable)
        except KeyboardInterrupt:  # a Ctrl-C landing in this hook would be swallowed in its turn
            pass
        owed.append(signal.SIGINT)
        # From a thread of its own: pressed from here, the Ctrl-C would be acted on before this hook returns,
        # inside it, and swallowed again. The thread runs once this one lets go of the interpreter lock (within
        # about sys.getswitchinterval(), unless the machine is busy); threading.Thread would wait in here for it
        # to start. Should the Ctrl-C land where it is swallowed again, it comes back here and goes round again.
        _thread.start_new_thread(press_an_owed_ctrl_c, ())

    sys.unraisablehook = press_ctrl_c_again
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        ctrl_c_owed = bool(owed)
        owed.clear()  # a thread that has not run yet finds nothing left to press
    if ctrl_c_owed:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_after_writing():
    """Within the block, which writes a file, a Ctrl-C waits for the block's end, then acts as it would have.

    A KeyboardInterrupt raised in the middle of numpy.savez's zip writing (a second Ctrl-C during the
    save that the first one asked for) comes out of it as a ValueError and its traceback; the old file
    was kept, but the command did not end with status 130 and one line.
    """
    pressed = []
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        for signum in pressed:
            handler = signal.getsignal(signal.SIGINT)  # a first press (request_stop) replaces itself
            if callable(handler):
                handler(signum, None)


def loop(run, progress, stop_requested):
    """Steps from run.step to --max-iters, with evaluations, saves and progress lines.

    Returns (the last evaluation's losses, whether the loss curve was drawn), or None
    when Ctrl-C stopped the run (its state saved in last.npz).
    """
    cfg = run.cfg
    model = run.model if cfg.threads == 1 else parallel.ShardedGPT(run.model, cfg.threads)
    # Reading values back is free on the CPU and costly on a GPU: see minillm/readback.py.
    clock, watch = StepClock(run.device), NonfiniteWatch(run.device, run.model.dtype, run.out_dir)
    # --log-layers: the logged steps' updates measured per parameter group (minillm/health.py).
    layer_watch = LayerWatch(run.model.params) if cfg.log_layers else None

    def sync_point():
        """Let the device finish the queued steps; fail if one of them went non-finite."""
        clock.pause()
        watch.check()

    start_step, stopped_early = run.step, False
    ranks, rows = run.ranks, run.world.rows(cfg.batch_size)  # rows: this rank's share of each batch
    train_batch = lambda rng: run.batch(run.train_split, rng, rows)
    try:
        while True:
            step = run.step
            if step % cfg.eval_interval == 0 or step >= cfg.max_iters:
                sync_point()
                losses, plotted = evaluate_and_keep_best(run, model, progress, start_step)
                stopped_early = cfg.patience and run.since_best >= cfg.patience
            if (step % cfg.save_interval == 0 and step > start_step) or step >= cfg.max_iters or stopped_early:
                sync_point()
                run.save(run.last_path)
            if stopped_early:
                progress.print(
                    f"early stop at step {step}: no better val loss in {run.since_best} evaluations "
                    f"(--patience {cfg.patience})"
                )
            if stopped_early or step >= cfg.max_iters:
                return losses, plotted
            if run.world.any(stop_requested[0]):  # the ranks stop together, at the same step
                sync_point()
                run.save(run.last_path)
                progress.print(f"stopped at step {step}; saved {run.last_path}; continue with --resume")
                return None

            logged = (step + 1) % cfg.log_interval == 0 or step == start_step
            clock.start()
            loss, grad_norm, tokens = train_step(model, run.optimizer, train_batch, step, cfg, watch, ranks,
                                                 layer_watch if logged else None)
            clock.count(tokens)
            run.step = step + 1
            if logged:
                sync_point()
                ms_per_step, tokens_per_s = clock.rates()
                progress.report(
                    {"step": run.step, "loss": backend.to_float(loss), "grad_norm": backend.to_float(grad_norm),
                     "lr": learning_rate(step, cfg), "ms_per_step": ms_per_step, "tokens_per_s": tokens_per_s}
                    | (layer_watch.report(grad_norm, cfg.grad_clip) if layer_watch else {})
                )
            progress.advance()
    finally:
        if model is not run.model:
            model.close()


def evaluate_and_keep_best(run, model, progress, start_step):
    """Both splits' losses, a short sample, the best checkpoint when val improved, the loss curve.

    Returns (losses, whether the loss curve was drawn).
    """
    cfg, step = run.cfg, run.step
    progress.print(f"step {step}: evaluating ({cfg.eval_iters} batches per split)")
    started = time.perf_counter()
    losses = {name: estimate_loss(model, batches, run.world) for name, batches in run.eval_batches.items()}
    progress.record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
    progress.print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                   f"({time.perf_counter() - started:.1f} s)")
    samples = show_samples(run, run.model, min(100, cfg.sample_tokens) if run.world.is_main else 0,
                           stream_seed(cfg.seed, SAMPLE_STREAM, step))
    if samples:
        progress.print(f"  {'held-out prompts' if run.held_out else 'sample'}:\n{samples}")
    if losses["val"] < run.best_val:
        run.best_val, run.since_best = losses["val"], 0
        run.save(run.best_path, val_loss=run.best_val)
    elif step > start_step:
        run.since_best += 1
    if not run.world.is_main:
        return losses, False
    with ctrl_c_after_writing():
        if cfg.log_layers:
            plot_layers(progress.log_path, run.out_dir / LAYERS_PLOT_FILE)
        return losses, plot_losses(progress.log_path, run.out_dir / PLOT_FILE)


def estimate_loss(model, batches, world=distributed.SINGLE_PROCESS):
    """Mean loss over fixed batches with dropout off, as a Python float (one device sync).

    On several ranks each evaluates every size-th batch, and the ranks sum their totals."""
    model.eval()
    total = sum(model(idx, targets)[1] for idx, targets in batches[world.rank::world.size])
    model.train()
    return float(world.allreduce(numpy.array([backend.to_float(total)]))[0]) / len(batches)


def finish(run, start_step, seconds, log_path, losses, plotted):
    """After the last step: the best checkpoint reloaded, a longer sample from it, the LoRA merge, where
    everything is. Returns the best model (adapters merged)."""
    cfg = run.cfg
    best_model, _, meta, _ = checkpoint.load(run.best_path, device=run.device)
    best_model.layers = run.model.layers
    print(
        f"\nfinal: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}; "
        f"best val loss {meta['val_loss']:.4f} at step {meta['step']}\n"
        f"trained: steps {start_step} to {run.step} in {seconds:.1f} s"
    )
    best_model = finetune.merged(best_model)  # LoRA adapters folded in (a plain model stays as it is)
    samples = show_samples(run, best_model, cfg.sample_tokens, cfg.seed)
    if samples:
        print(f"{'held-out prompts' if run.held_out else 'sample'} from the best checkpoint:\n{samples}")
    print(f"\ncheckpoint: {run.best_path} (resume state: {run.last_path})")
    if cfg.merge_lora:
        merged_path = run.out_dir / MERGED_CHECKPOINT
        with ctrl_c_after_writing():
            checkpoint.save(merged_path, best_model, run.tokenizer, step=meta["step"], val_loss=meta["val_loss"],
                            train_config=asdict(cfg))
        print(f"LoRA adapters merged into the weights: {merged_path}")
    print(f"log: {log_path}" + (f", loss curve: {run.out_dir / PLOT_FILE}" if plotted else
          " (install matplotlib for a loss-curve picture: pip install -e \".[plots]\")"))
    if cfg.log_layers and plotted:
        print(f"gradient norms and update/weight ratios per layer: {run.out_dir / LAYERS_PLOT_FILE}")
    print(f"sample from it: python generate.py --ckpt {run.best_path}")
    return best_model
