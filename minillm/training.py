"""The training loop: data -> model -> loss -> backward -> AdamW, with evaluation and checkpoints.

Each step accumulates the gradients of `grad_accum` micro-batches (each the mean
over its own tokens, so the average of the micro-batch gradients equals the
gradient of the whole batch), clips them by global norm, and takes one AdamW step
at the learning rate of the warmup + cosine schedule.
"""

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy

from minillm import backend, checkpoint, data
from minillm.model import GPT, ConfigError, GPTConfig
from minillm.optim import AdamW, clip_grad_norm, cosine_lr
from minillm.sampling import generate
from minillm.tokenizers.char import CharTokenizer

CHECKPOINT_NAME = "ckpt.npz"


@dataclass
class TrainConfig:
    """Defaults: the 'baby' character-level model, a few minutes on a laptop CPU."""

    data: str = ""  # a text file or folder of .txt files; empty: the built-in corpus
    out_dir: str = "out"
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
    log_interval: int = 50
    sample_tokens: int = 200
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"


HELP = {
    "data": "UTF-8 text file or folder of .txt files (default: Python's documentation topics, built in)",
    "out_dir": "folder for the checkpoint",
    "n_layer": "transformer blocks",
    "n_head": "attention heads (must divide --n-embd)",
    "n_embd": "embedding width",
    "block_size": "context length in tokens",
    "dropout": "dropout probability on attention weights and residual branches",
    "bias": "biases in linear layers and LayerNorms (--no-bias to drop them)",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches accumulated into one optimizer step",
    "max_iters": "optimizer steps",
    "lr": "peak learning rate",
    "min_lr": "learning-rate floor of the cosine decay",
    "warmup_iters": "steps of linear warmup",
    "lr_decay_iters": "step at which the cosine decay reaches --min-lr",
    "weight_decay": "AdamW decoupled weight decay (matrices and embeddings only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "eval_interval": "steps between evaluations (and checkpoints)",
    "eval_iters": "batches per split in each evaluation",
    "log_interval": "steps between progress lines",
    "sample_tokens": "characters sampled after evaluation and at the end",
    "seed": "random seed (initialisation, batches, dropout)",
    "device": "cpu, cuda, or auto (CUDA when CuPy and a GPU are present)",
    "dtype": "float32 or float64",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a GPT on a text corpus, character by character."
    )
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=HELP[field.name])
        else:
            parser.add_argument(flag, type=field.type, default=field.default, help=f"{HELP[field.name]} (default: {field.default})")
    args = parser.parse_args(argv)
    return TrainConfig(**vars(args))


def estimate_loss(model, batches):
    """Mean loss over fixed batches, with dropout off; a Python float (one device sync)."""
    model.eval()
    total = sum(model(x, y)[1] for x, y in batches)
    model.train()
    return float(total) / len(batches)


def sample_text(model, tokenizer, n_tokens, seed):
    start = tokenizer.encode("\n") if "\n" in tokenizer.ids else [0]
    ids = generate(model, numpy.array([start]), n_tokens, temperature=0.8, top_k=None, seed=seed)
    return tokenizer.decode(backend.to_host(ids)[0, len(start):])


def train(cfg):
    text = data.read_text(cfg.data) if cfg.data else data.builtin_corpus()
    tokenizer = CharTokenizer.from_text(text)
    train_tokens, val_tokens = data.split(data.token_array(tokenizer.encode(text), tokenizer.vocab_size))
    data.check_long_enough(train_tokens, cfg.block_size, "train")
    data.check_long_enough(val_tokens, cfg.block_size, "val")

    device = backend.resolve_device(cfg.device)
    model_config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
    )
    model = GPT(model_config, seed=cfg.seed, dtype=cfg.dtype, device=device)
    optimizer = AdamW(
        model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    batch_rng = numpy.random.default_rng(cfg.seed)
    # The same evaluation batches every time, so successive evaluations are comparable.
    eval_rng = numpy.random.default_rng(cfg.seed + 1)
    eval_batches = {
        split: [data.get_batch(tokens, cfg.batch_size, cfg.block_size, eval_rng) for _ in range(cfg.eval_iters)]
        for split, tokens in (("train", train_tokens), ("val", val_tokens))
    }
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME
    print(
        f"corpus: {len(text):,} characters, vocabulary {tokenizer.vocab_size}; "
        f"model: {model.num_params():,} parameters on {device} ({cfg.dtype})"
    )

    best_val = math.inf
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    t_last = time.perf_counter()
    for step in range(cfg.max_iters + 1):
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            losses = {split: estimate_loss(model, batches) for split, batches in eval_batches.items()}
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val:
                best_val = losses["val"]
                checkpoint.save(
                    ckpt_path, model, tokenizer, optimizer,
                    step=step, val_loss=best_val, train_config=asdict(cfg),
                )
        if step == cfg.max_iters:
            break

        lr = cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
        grads = None
        for _ in range(cfg.grad_accum):
            x, y = data.get_batch(train_tokens, cfg.batch_size, cfg.block_size, batch_rng)
            _, loss = model(x, y)
            micro = model.backward()
            if grads is None:
                grads = micro
            else:
                for name, g in micro.items():
                    grads[name] += g
        if cfg.grad_accum > 1:
            for g in grads.values():
                g *= 1.0 / cfg.grad_accum
        grad_norm = clip_grad_norm(grads, cfg.grad_clip)
        optimizer.step(grads, lr=lr)

        if step % cfg.log_interval == 0:
            elapsed = time.perf_counter() - t_last
            steps = cfg.log_interval if step else 1
            t_last = time.perf_counter()
            print(
                f"step {step}: loss {float(loss):.4f}, grad norm {float(grad_norm):.3f}, lr {lr:.2e}, "
                f"{1000 * elapsed / steps:.0f} ms/step, {tokens_per_step * steps / elapsed:,.0f} tokens/s"
            )

    best_model, tokenizer, meta, _ = checkpoint.load(ckpt_path, device=device)
    print(f"\nsample from the best checkpoint (step {meta['step']}, val loss {meta['val_loss']:.4f}):")
    print(sample_text(best_model, tokenizer, cfg.sample_tokens, cfg.seed))
    print(f"\ncheckpoint: {ckpt_path}")
    print(f"sample more: python generate.py --ckpt {ckpt_path}")
    return best_model


USAGE_ERRORS = (ConfigError, data.DataError, backend.BackendError)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except USAGE_ERRORS as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except checkpoint.CheckpointError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; the best checkpoint so far is in " + str(Path(cfg.out_dir) / CHECKPOINT_NAME))
        return 130
    return 0
