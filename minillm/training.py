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

Randomness is counter-based: the batches and the dropout masks of step k come
from generators seeded with (seed, k). Resuming at step k therefore needs no saved
generator state, and a resumed run repeats an uninterrupted one exactly.

The out dir holds:
    ckpt.npz     the best model so far (lowest validation loss)
    last.npz     the latest state, for --resume (parameters, AdamW moments, step)
    merged.npz   with --merge-lora: ckpt.npz with its adapters merged
    train.bin, val.bin   the token files
    log.jsonl    one JSON object per progress line and per evaluation
    loss.png     the loss curves (when matplotlib is installed)
"""

import math
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy

from minillm import backend, checkpoint, data, parallel, sft
from minillm.model import GPT, ConfigError, GPTConfig
from minillm.optim import AdamW, clip_grad_norm, cosine_lr
from minillm.progress import PLOT_FILE, Progress, plot_losses
from minillm.readback import NonfiniteWatch, StepClock, checks_each_step, describe_nonfinite, nonfinite_error
from minillm.sampling import encode_prompt, generate
from minillm.tokenizers.char import CharTokenizer

BEST_CHECKPOINT = "ckpt.npz"
LAST_CHECKPOINT = "last.npz"
MERGED_CHECKPOINT = "merged.npz"

# Independent random streams, each seeded with (seed, stream, step).
BATCH_STREAM, DROPOUT_STREAM, EVAL_STREAM, SAMPLE_STREAM = range(4)


@dataclass
class TrainConfig:
    """Every training option; the defaults are the `baby` preset."""

    data: str = ""
    dataset: str = ""
    sft: str = ""
    out_dir: str = "out"
    resume: bool = False
    init_from: str = ""
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
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    patience: int = 0  # 0: no early stopping
    save_interval: int = 250
    log_interval: int = 50
    sample_tokens: int = 200
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0  # 0: one per CPU core (1 on a GPU)


PRESETS = {
    # nanoGPT's CPU-sized character model: a few minutes on a laptop.
    "baby": {},
    # nanoGPT's shakespeare-char model, batch 8: wants a fast CPU or a GPU.
    "small": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, dropout=0.2,
        max_iters=5000, lr_decay_iters=5000, eval_interval=500, save_interval=500, eval_iters=50,
    ),
}


def stream_rng(seed, stream, *keys):
    """A NumPy generator for one (stream, step, ...): the same numbers on every run and resume."""
    return numpy.random.default_rng([seed, stream, *keys])


def stream_seed(seed, stream, *keys):
    """An integer seed for one (stream, step, ...), for generators on the model's device."""
    return int(numpy.random.SeedSequence([seed, stream, *keys]).generate_state(1)[0])


def validate(cfg):
    """Raise ConfigError naming the first option (as its flag) whose value cannot work.

    The comparisons are written so that NaN fails them too.
    """
    flag = lambda name: "--" + name.replace("_", "-")
    positive = (
        "n_layer", "n_head", "n_embd", "block_size",
        "batch_size", "grad_accum", "eval_interval", "eval_iters", "save_interval", "log_interval",
    )
    non_negative = (
        "max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "min_lr", "weight_decay", "grad_clip", "threads",
        "patience", "freeze_blocks", "lora_rank", "seed",
    )
    for name in positive:
        if not getattr(cfg, name) >= 1:
            raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if not 0 <= getattr(cfg, name) < math.inf:
            raise ConfigError(f"{flag(name)} must be 0 or more (and finite), got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    if not 0 < cfg.lr < math.inf:
        raise ConfigError(f"--lr must be positive and finite, got {cfg.lr}")
    if not 0 < cfg.lora_alpha < math.inf:
        raise ConfigError(f"--lora-alpha must be positive and finite, got {cfg.lora_alpha}")
    for name in ("beta1", "beta2", "dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{flag(name)} must be in [0, 1), got {getattr(cfg, name)}")
    if sum(map(bool, (cfg.data, cfg.dataset, cfg.sft))) > 1:
        raise ConfigError("--data, --dataset and --sft name different training data: give one of them")
    fine_tuning = ("freeze_embeddings", "freeze_blocks", "lora_rank", "merge_lora")
    for name in fine_tuning:
        if getattr(cfg, name) and not cfg.init_from:
            raise ConfigError(f"--{name.replace('_', '-')} fine-tunes a pretrained model: give --init-from too")
    if cfg.merge_lora and not cfg.lora_rank:
        raise ConfigError("--merge-lora merges LoRA adapters: give --lora-rank too")
    backend.dtype_of(cfg.dtype)


def load_corpus(cfg):
    """(text, description, examples) of the data the options name; the built-in corpus by default.

    examples are --sft's (line, prompt, completion)s, and text then all their text; else None.
    """
    if cfg.sft:
        examples, description = sft.load_examples(cfg.sft)
        return sft.corpus_text(examples), description, examples
    if cfg.dataset:
        path = data.fetch_dataset(cfg.dataset)
        return data.read_text(path), f"{cfg.dataset} ({path})", None
    if cfg.data:
        return data.read_text(cfg.data), cfg.data, None
    return data.builtin_corpus(), "built-in (Python documentation topics)", None


def prepare_batches(cfg, text, corpus_name, examples, tokenizer, out_dir):
    """(train split, val split, what they hold, batch(split, rng) -> (x, y)) for text or --sft examples."""
    if examples is None:
        train_split, val_split = data.prepare_splits(text, tokenizer, out_dir, cfg.block_size, source=corpus_name)
        summary = f"{len(text):,} characters, {len(train_split):,} train and {len(val_split):,} val tokens"
        return train_split, val_split, summary, lambda split, rng: data.get_batch(split, cfg.batch_size, cfg.block_size, rng)
    train_split, val_split = sft.prepare_splits(examples, tokenizer, cfg.block_size, cfg.sft)
    summary = f"{len(train_split):,} train and {len(val_split):,} val prompt/completion pairs"
    return train_split, val_split, summary, lambda split, rng: sft.get_batch(split, cfg.batch_size, rng)


def estimate_loss(model, batches, workers):
    """Mean loss over fixed batches with dropout off, as a Python float (one device sync)."""
    model.eval()
    loss = parallel.mean_loss(model, batches, workers)
    model.train()
    return loss


def sample_text(model, tokenizer, n_tokens, seed):
    """A sample that starts from a newline (or token 0 when the vocabulary has none)."""
    start = encode_prompt(tokenizer, "")
    ids = generate(model, numpy.array([start]), n_tokens, temperature=0.8, seed=seed)
    return tokenizer.decode(backend.to_host(ids)[0, len(start):])


def step_gradients(model, train_split, batch, cfg, step, workers, device):
    """(mean loss, mean gradients, tokens) over the step's grad_accum micro-batches batch(train_split, rng).

    The micro-batches, and each thread's dropout masks, come from generators
    seeded with the step: the same step always sees the same data and masks.
    """
    batch_rng = stream_rng(cfg.seed, BATCH_STREAM, step)
    total_loss, grads, tokens = 0.0, None, 0
    for micro in range(cfg.grad_accum):
        x, y = batch(train_split, batch_rng)
        tokens += x.size
        rngs = [backend.RNG(stream_seed(cfg.seed, DROPOUT_STREAM, step, micro, shard), device)
                for shard in range(cfg.threads)]
        loss, micro_grads = parallel.loss_and_gradients(model, x, y, rngs, workers)
        total_loss = total_loss + loss
        if grads is None:
            grads = micro_grads
        else:
            for name, g in micro_grads.items():
                grads[name] += g
    if cfg.grad_accum > 1:
        for g in grads.values():
            g *= 1.0 / cfg.grad_accum
    return total_loss / cfg.grad_accum, grads, tokens


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


def build_or_resume(cfg, tokenizer, device, resumed, pretrained):
    """(model, optimizer, start step, best val loss, evaluations since the best): fresh, from
    pretrained weights, or from last.npz.

    A pretrained model keeps its own shape (the model options are ignored) and
    trains with windows of --block-size tokens, at most its context; it starts
    with a fresh optimizer and schedule, and with fresh LoRA adapters when asked.
    """
    model_config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
    )
    if resumed is None:
        if pretrained is None:
            model = GPT(model_config, seed=cfg.seed, dtype=cfg.dtype, device=device)
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
                model = model.with_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
        start_step, best_val, since_best, optimizer_state = 0, math.inf, 0, None
    else:
        model, _, meta, optimizer_state = resumed
        if not cfg.init_from and model.config != model_config:
            raise ConfigError(
                f"the checkpoint's model ({model.config}) differs from the options given; "
                "resume with the options of that run"
            )
        if model.dtype != backend.dtype_of(cfg.dtype):
            raise ConfigError(f"the checkpoint holds {model.dtype} parameters; resume with --dtype {model.dtype}")
        start_step, best_val, since_best = meta["step"], meta["best_val_loss"], meta.get("evals_since_best", 0)
    model.frozen = frozen_names(model, cfg)
    optimizer = AdamW(model.trainable_params(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except ValueError as err:
            raise ConfigError(f"{LAST_CHECKPOINT}: {err}; resume with the freeze and LoRA options of that run") from None
    return model, optimizer, start_step, best_val, since_best


# A non-finite loss or gradient is caught and reported with its step (and, on the CPU, its layer);
# NumPy's overflow warnings would only say the same thing earlier and less clearly.
@numpy.errstate(over="ignore", invalid="ignore")
def train(cfg):
    """Run training as configured; returns the best model (reloaded from its checkpoint)."""
    validate(cfg)
    device = backend.resolve_device(cfg.device)
    # A concrete thread count, saved with the run: the dropout masks depend on how the batch is split.
    cfg = replace(cfg, threads=cfg.threads or (parallel.usable_cores() if device == "cpu" else 1))
    out_dir = Path(cfg.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise checkpoint.CheckpointError(f"cannot create the out dir {out_dir}: {err.strerror}") from None
    parallel.keep_freed_memory()
    with checkpoint.exclusive(out_dir):
        return run(cfg, device, out_dir)


def run(cfg, device, out_dir):
    """The training run of train(), once the options are checked and the out dir is ours."""
    text, corpus_name, examples = load_corpus(cfg)
    resumed = checkpoint.load(out_dir / LAST_CHECKPOINT, device=device) if cfg.resume else None
    pretrained = checkpoint.load_pretrained(cfg.init_from, device, cfg.dtype) if cfg.init_from and not resumed else None
    # A resumed or pretrained model keeps its vocabulary: the token ids must mean what they meant.
    tokenizer = resumed[1] if resumed else pretrained[1] if pretrained else CharTokenizer.from_text(text)
    train_split, val_split, data_summary, batch = prepare_batches(cfg, text, corpus_name, examples, tokenizer, out_dir)
    model, optimizer, start_step, best_val, since_best = build_or_resume(cfg, tokenizer, device, resumed, pretrained)

    eval_rng = stream_rng(cfg.seed, EVAL_STREAM, 0)
    # The same evaluation batches every time, so successive evaluations are comparable.
    eval_batches = {
        name: [batch(split, eval_rng) for _ in range(cfg.eval_iters)]
        for name, split in (("train", train_split), ("val", val_split))
    }
    best_path, last_path = out_dir / BEST_CHECKPOINT, out_dir / LAST_CHECKPOINT
    trainable = sum(int(p.size) for p in model.trainable_params().values())
    print(
        f"corpus: {corpus_name}, {data_summary}, vocabulary {tokenizer.vocab_size}\n"
        f"model: {model.num_params():,} parameters, {trainable:,} trainable "
        f"(AdamW state {2 * trainable * model.dtype.itemsize / 2**20:.2f} MiB), on {device}"
        + (" (--device auto found no CUDA GPU with CuPy)" if cfg.device == "auto" and device == "cpu" else "") + " "
        f"({cfg.dtype}, {cfg.threads} threads)" + (f"; resuming at step {start_step}" if start_step else "")
    )

    def save(path, step, **extra):
        checkpoint.save(
            path, model, tokenizer, optimizer,
            step=step, best_val_loss=best_val, evals_since_best=since_best, train_config=asdict(cfg), **extra,
        )

    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    started_run = time.perf_counter()
    progress = Progress(cfg, start_step, out_dir)
    workers = parallel.Workers(cfg.threads)
    plotted = True
    stopped_early = False
    # Reading values back is free on the CPU and costly on a GPU: see minillm/readback.py.
    check_each_step = checks_each_step(device)
    clock, watch = StepClock(device), NonfiniteWatch(device, model.dtype)

    def sync_point():
        """Let the device finish the queued steps; fail if one of them went non-finite."""
        clock.pause()
        watch.check(out_dir)

    try:
        for step in range(start_step, cfg.max_iters + 1):
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                sync_point()
                losses = {name: estimate_loss(model, batches, workers) for name, batches in eval_batches.items()}
                progress.record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
                sample = sample_text(model, tokenizer, min(100, cfg.sample_tokens), stream_seed(cfg.seed, SAMPLE_STREAM, step))
                progress.print(
                    f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}\n"
                    f"  sample: {sample!r}"
                )
                if losses["val"] < best_val:
                    best_val, since_best = losses["val"], 0
                    save(best_path, step, val_loss=best_val)
                elif step > start_step:
                    since_best += 1
                plotted = plot_losses(progress.log_path, out_dir / PLOT_FILE)
                stopped_early = cfg.patience and since_best >= cfg.patience
            if (step % cfg.save_interval == 0 and step > start_step) or step == cfg.max_iters or stopped_early:
                sync_point()
                save(last_path, step)
            if stopped_early:
                progress.print(
                    f"early stop at step {step}: no better val loss in {since_best} evaluations (--patience {cfg.patience})"
                )
                break
            if step == cfg.max_iters:
                break
            if stop_requested:
                sync_point()
                save(last_path, step)
                progress.print(f"stopped at step {step}; saved {last_path}; continue with --resume")
                return None

            clock.start()
            lr = cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
            loss, grads, tokens = step_gradients(model, train_split, batch, cfg, step, workers, device)
            grad_norm = clip_grad_norm(grads, cfg.grad_clip)
            if check_each_step:
                loss_value = backend.to_float(loss)
                if not (math.isfinite(loss_value) and math.isfinite(backend.to_float(grad_norm))):
                    raise nonfinite_error(step, describe_nonfinite(loss_value, grads), out_dir)
            else:
                watch.record(step, loss, grad_norm)
            optimizer.step(grads, lr=lr)
            clock.count(tokens)

            show = (step + 1) % cfg.log_interval == 0 or step == start_step
            if show:
                sync_point()
                ms_per_step, tokens_per_s = clock.rates()
                progress.report(
                    {"step": step + 1, "loss": backend.to_float(loss), "grad_norm": backend.to_float(grad_norm),
                     "lr": lr, "ms_per_step": ms_per_step, "tokens_per_s": tokens_per_s}
                )
            progress.advance()
    finally:
        workers.close()
        progress.close()
        signal.signal(signal.SIGINT, previous_handler)

    best_model, _, meta, _ = checkpoint.load(best_path, device=device)
    print(
        f"\nfinal: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}; "
        f"best val loss {meta['val_loss']:.4f} at step {meta['step']}\n"
        f"trained: steps {start_step} to {step} in {time.perf_counter() - started_run:.1f} s"
    )
    best_model = best_model.merged()  # LoRA adapters folded in (a plain model stays as it is)
    print("sample from the best checkpoint:\n" + sample_text(best_model, tokenizer, cfg.sample_tokens, cfg.seed))
    print(f"\ncheckpoint: {best_path} (resume state: {last_path})")
    if cfg.merge_lora:
        merged_path = out_dir / MERGED_CHECKPOINT
        checkpoint.save(merged_path, best_model, tokenizer, step=meta["step"], val_loss=meta["val_loss"],
                        train_config=asdict(cfg))
        print(f"LoRA adapters merged into the weights: {merged_path}")
    print(f"log: {progress.log_path}" + (f", loss curve: {out_dir / PLOT_FILE}" if plotted else
          " (install matplotlib for a loss-curve picture: pip install -e '.[plots]')"))
    print(f"sample from it: python generate.py --ckpt {best_path}")
    return best_model
