"""Pretraining: data -> model -> loss -> backward -> AdamW, with evaluation, logs and checkpoints.

Each step averages the gradients of `grad_accum` micro-batches (each the mean over
its own tokens, so the average equals the gradient of the whole batch), clips them
by global norm, and takes one AdamW step at the warmup + cosine learning rate.

Randomness is counter-based: the batches and the dropout masks of step k come
from generators seeded with (seed, k). Resuming at step k therefore needs no saved
generator state, and a resumed run repeats an uninterrupted one exactly.

The out dir holds:
    ckpt.npz     the best model so far (lowest validation loss)
    last.npz     the latest state, for --resume (parameters, AdamW moments, step)
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

from minillm import backend, checkpoint, data, parallel
from minillm.model import GPT, ConfigError, GPTConfig
from minillm.optim import AdamW, clip_grad_norm, cosine_lr
from minillm.progress import PLOT_FILE, Progress, plot_losses
from minillm.sampling import encode_prompt, generate
from minillm.tokenizers.char import CharTokenizer

BEST_CHECKPOINT = "ckpt.npz"
LAST_CHECKPOINT = "last.npz"

# Independent random streams, each seeded with (seed, stream, step).
BATCH_STREAM, DROPOUT_STREAM, EVAL_STREAM, SAMPLE_STREAM = range(4)


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


@dataclass
class TrainConfig:
    """Every training option; the defaults are the `baby` preset."""

    data: str = ""
    dataset: str = ""
    out_dir: str = "out"
    resume: bool = False
    init_from: str = ""
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
    """Raise ConfigError naming the first option whose value cannot work."""
    positive = ("batch_size", "grad_accum", "eval_interval", "eval_iters", "save_interval", "log_interval")
    non_negative = (
        "max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "min_lr", "weight_decay", "grad_clip", "threads",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.data and cfg.dataset:
        raise ConfigError("--data and --dataset name two corpora: give one of them")
    backend.dtype_of(cfg.dtype)


def load_corpus(cfg):
    """(text, description) of the corpus the options name; the built-in one by default."""
    if cfg.dataset:
        path = data.fetch_dataset(cfg.dataset)
        return data.read_text(path), f"{cfg.dataset} ({path})"
    if cfg.data:
        return data.read_text(cfg.data), cfg.data
    return data.builtin_corpus(), "built-in (Python documentation topics)"


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


def describe_nonfinite(loss, grads):
    """Where the numbers first went bad: the loss itself, or the first non-finite gradient.

    The backward pass computes the gradients from the output back to the input,
    the reverse of the order of model.params, so that is the order searched.
    """
    if not math.isfinite(loss):
        return f"the loss is {loss} (the forward pass overflowed)"
    for name in reversed(list(grads)):
        if not bool(backend.get_array_module(grads[name]).isfinite(grads[name]).all()):
            return f"the loss is finite, but the gradient of {name} is the first to be non-finite"
    return "the gradient norm overflowed"


def step_gradients(model, tokens, cfg, step, workers, device):
    """(mean loss, mean gradients) over the step's grad_accum micro-batches of batch_size windows.

    The micro-batches, and each thread's dropout masks, come from generators
    seeded with the step: the same step always sees the same data and masks.
    """
    batch_rng = stream_rng(cfg.seed, BATCH_STREAM, step)
    total_loss, grads = 0.0, None
    for micro in range(cfg.grad_accum):
        x, y = data.get_batch(tokens, cfg.batch_size, cfg.block_size, batch_rng)
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
    return total_loss / cfg.grad_accum, grads


def build_or_resume(cfg, tokenizer, device, resumed, pretrained):
    """(model, optimizer, start step, best val loss): fresh, from pretrained weights, or from last.npz.

    A pretrained model keeps its own shape (the model options are ignored) and
    trains with windows of --block-size tokens, at most its context; it starts
    with a fresh optimizer and schedule.
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
        start_step, best_val, optimizer_state = 0, math.inf, None
    else:
        model, _, meta, optimizer_state = resumed
        if not cfg.init_from and model.config != model_config:
            raise ConfigError(
                f"the checkpoint's model ({model.config}) differs from the options given; "
                "resume with the options of that run"
            )
        if model.dtype != backend.dtype_of(cfg.dtype):
            raise ConfigError(f"the checkpoint holds {model.dtype} parameters; resume with --dtype {model.dtype}")
        start_step, best_val = meta["step"], meta["best_val_loss"]
    optimizer = AdamW(model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return model, optimizer, start_step, best_val


# A non-finite loss or gradient is caught and reported with its step and layer;
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

    text, corpus_name = load_corpus(cfg)
    resumed = checkpoint.load(out_dir / LAST_CHECKPOINT, device=device) if cfg.resume else None
    pretrained = checkpoint.load_pretrained(cfg.init_from, device, cfg.dtype) if cfg.init_from and not resumed else None
    # A resumed or pretrained model keeps its vocabulary: the token ids must mean what they meant.
    tokenizer = resumed[1] if resumed else pretrained[1] if pretrained else CharTokenizer.from_text(text)
    train_tokens, val_tokens = data.prepare_splits(text, tokenizer, out_dir, cfg.block_size)
    model, optimizer, start_step, best_val = build_or_resume(cfg, tokenizer, device, resumed, pretrained)

    eval_rng = stream_rng(cfg.seed, EVAL_STREAM, 0)
    # The same evaluation batches every time, so successive evaluations are comparable.
    eval_batches = {
        name: [data.get_batch(tokens, cfg.batch_size, cfg.block_size, eval_rng) for _ in range(cfg.eval_iters)]
        for name, tokens in (("train", train_tokens), ("val", val_tokens))
    }
    best_path, last_path = out_dir / BEST_CHECKPOINT, out_dir / LAST_CHECKPOINT
    print(
        f"corpus: {corpus_name}, {len(text):,} characters, {len(train_tokens):,} train and "
        f"{len(val_tokens):,} val tokens, vocabulary {tokenizer.vocab_size}\n"
        f"model: {model.num_params():,} parameters on {device} ({cfg.dtype}, {cfg.threads} threads)"
        + (f"; resuming at step {start_step}" if start_step else "")
    )

    def save(path, step, **extra):
        checkpoint.save(
            path, model, tokenizer, optimizer,
            step=step, best_val_loss=best_val, train_config=asdict(cfg), **extra,
        )

    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    progress = Progress(cfg, start_step, out_dir)
    workers = parallel.Workers(cfg.threads)
    plotted = True
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    step_seconds = []
    try:
        for step in range(start_step, cfg.max_iters + 1):
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                losses = {name: estimate_loss(model, batches, workers) for name, batches in eval_batches.items()}
                progress.record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
                sample = sample_text(model, tokenizer, min(100, cfg.sample_tokens), stream_seed(cfg.seed, SAMPLE_STREAM, step))
                progress.print(
                    f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}\n"
                    f"  sample: {sample!r}"
                )
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    save(best_path, step, val_loss=best_val)
                plotted = plot_losses(progress.log_path, out_dir / PLOT_FILE)
            if (step % cfg.save_interval == 0 and step > start_step) or step == cfg.max_iters:
                save(last_path, step)
            if step == cfg.max_iters:
                break
            if stop_requested:
                save(last_path, step)
                progress.print(f"stopped at step {step}; saved {last_path}; continue with --resume")
                return None

            started = time.perf_counter()
            lr = cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
            loss, grads = step_gradients(model, train_tokens, cfg, step, workers, device)
            grad_norm = float(clip_grad_norm(grads, cfg.grad_clip))
            loss = float(loss)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingError(
                    f"step {step}: {describe_nonfinite(loss, grads)}; nothing from this step was saved, "
                    f"the last good checkpoints in {out_dir} are kept. Try a lower --lr or a --grad-clip"
                )
            optimizer.step(grads, lr=lr)
            step_seconds.append(time.perf_counter() - started)

            show = (step + 1) % cfg.log_interval == 0 or step == start_step
            seconds = sum(step_seconds) / len(step_seconds)
            progress.step(
                {"step": step + 1, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                 "ms_per_step": 1000 * seconds, "tokens_per_s": tokens_per_step / seconds},
                show,
            )
            if show:
                step_seconds = []
    finally:
        workers.close()
        progress.close()
        signal.signal(signal.SIGINT, previous_handler)

    best_model, _, meta, _ = checkpoint.load(best_path, device=device)
    print(
        f"\nfinal: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}; "
        f"best val loss {meta['val_loss']:.4f} at step {meta['step']}"
    )
    print("sample from the best checkpoint:\n" + sample_text(best_model, tokenizer, cfg.sample_tokens, cfg.seed))
    print(f"\ncheckpoint: {best_path} (resume state: {last_path})")
    print(f"log: {progress.log_path}" + (f", loss curve: {out_dir / PLOT_FILE}" if plotted else
          " (install matplotlib for a loss-curve picture: pip install -e '.[plots]')"))
    print(f"sample from it: python generate.py --ckpt {best_path}")
    return best_model
