"""Sampling text from a model, one token at a time.

For each new token: run the model on the last block_size tokens, take the logits
of the last position, divide them by the temperature, keep only the top_k largest
(optional), turn them into probabilities with softmax, and draw one token.
"""

import argparse
import sys
from pathlib import Path

from minillm import backend, checkpoint
from minillm.layers import softmax
from minillm.tokenizers.char import UnknownCharactersError


def sample_next(logits, temperature, top_k, rng):
    """Next token ids (B,) from last-position logits (B, V); temperature 0 means greedy."""
    xp = backend.get_array_module(logits)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = xp.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = xp.where(logits < kth_largest, -xp.inf, logits)
    probs, _ = softmax.forward(logits)
    # Inverse-CDF sampling: the first index whose cumulative probability exceeds u ~ U[0, 1).
    cdf = probs.cumsum(axis=-1)
    u = rng.uniform((logits.shape[0], 1), logits.dtype)
    return xp.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, seed=0):
    """idx (B, T) integer prompt -> (B, T + max_new_tokens) on the model's device."""
    xp = model.xp
    rng = backend.RNG(seed, model.device)
    was_training = model.training
    model.eval()
    idx = xp.asarray(idx)
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.config.block_size :])
            next_ids = sample_next(logits[:, -1, :], temperature, top_k, rng)
            idx = xp.concatenate([idx, next_ids[:, None].astype(idx.dtype)], axis=1)
    finally:
        model.train(was_training)
    return idx


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="generate.py", description="Sample text from a trained checkpoint.")
    parser.add_argument("--ckpt", default=None, help="checkpoint file (default: OUT_DIR/ckpt.npz)")
    parser.add_argument("--out-dir", default="out", help="folder of the checkpoint written by train.py (default: out)")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples, generated as one batch (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to add to the prompt (default: 500)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=1337, help="same seed, same text (default: 1337)")
    parser.add_argument("--device", default="auto", choices=backend.DEVICES, help="cpu, cuda or auto (default: auto)")
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_new_tokens", "top_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.temperature < 0:
        parser.error(f"--temperature must be 0 or more, got {args.temperature}")
    return args


def main(argv=None):
    args = parse_args(argv)
    ckpt = Path(args.ckpt) if args.ckpt else Path(args.out_dir) / "ckpt.npz"
    try:
        model, tokenizer, _, _ = checkpoint.load(ckpt, device=backend.resolve_device(args.device))
        prompt = tokenizer.encode(args.prompt)
    except (checkpoint.CheckpointError, backend.BackendError, UnknownCharactersError) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 1
    if not prompt:
        prompt = [0]
    idx = model.xp.asarray([prompt] * args.num_samples)
    out = backend.to_host(generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    for i, row in enumerate(out):
        if i:
            print("\n" + "-" * 40)
        print(tokenizer.decode(row))
    return 0
