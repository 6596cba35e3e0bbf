"""The default run's counterpart in PyTorch: nanoGPT's training loop, rebuilt, on train.py's token files.

    python -m minillm.bench.torch_run OUT_DIR [MAX_ITERS]

trains bench/torch_reference.py's TorchGPT (GPT-2's initialisation, as nanoGPT's; the shape
and hyperparameters of train.py's defaults, `baby`) the way nanoGPT's train.py runs its CPU
command (`--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0` on its shakespeare-char config):

- a batch is 12 random windows of a memory map opened anew for each batch;
- every 250 steps, and at steps 0 and 2000, 20 batches of each split in eval mode without
  gradients, and a checkpoint whenever the val loss improves (nanoGPT writes the weights and
  AdamW's moments with torch.save; here numpy.savez writes the same arrays, without pickle);
- each step: forward, the next batch, backward, gradient clipping at 1.0, AdamW (weight
  decay on the matrices only, beta2 0.99), with nanoGPT's warmup + cosine rate, and one
  progress line per step (it reads the loss with .item());
- 2001 steps (0 to 2000), on PyTorch's own thread count.

It reads OUT_DIR/train.bin and val.bin as written by `python train.py --out-dir OUT_DIR`
and prints its last val loss. This is not nanoGPT's own code (that is not an installable
package); bench/default_run.py times it beside train.py.
"""

import json
import math
import sys
import time
from pathlib import Path

import numpy
import torch

from minillm.bench.torch_reference import TorchGPT
from minillm.model import GPTConfig
from minillm.options import TrainConfig


def nanogpt_lr(step, cfg):
    """nanoGPT's get_lr: linear warmup from lr / (warmup + 1), then cosine decay to min_lr."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step > cfg.max_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / (cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def save_checkpoint(model, optimizer, path):
    """The weights and AdamW's moments, as nanoGPT's checkpoint holds them, in one .npz."""
    arrays = {name: p.detach().numpy() for name, p in model.state_dict().items()}
    for i, state in enumerate(optimizer.state.values()):
        arrays |= {f"{i}.exp_avg": state["exp_avg"].numpy(), f"{i}.exp_avg_sq": state["exp_avg_sq"].numpy()}
    numpy.savez(path, **arrays)


def run(out_dir, max_iters=TrainConfig.max_iters):
    cfg = TrainConfig(max_iters=max_iters)
    described = json.loads((Path(out_dir) / "tokens.json").read_text(encoding="utf-8"))
    dtype = numpy.dtype(described["train.bin"]["dtype"])
    vocab_size = described["tokenizer"]["vocab_size"]
    torch.manual_seed(1337)

    def get_batch(split):
        data = numpy.memmap(Path(out_dir) / f"{split}.bin", dtype=dtype, mode="r")
        starts = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + cfg.block_size].astype(numpy.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + cfg.block_size].astype(numpy.int64)) for i in starts])
        return x, y

    model = TorchGPT(GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                               n_head=cfg.n_head, n_embd=cfg.n_embd))
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                                   {"params": others, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        losses = {split: sum(model(*get_batch(split)).item() for _ in range(cfg.eval_iters)) / cfg.eval_iters
                  for split in ("train", "val")}
        model.train()
        return losses

    best_val = math.inf
    x, y = get_batch("train")
    last = time.time()
    for step in range(cfg.max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(step, cfg)
        if step % cfg.eval_interval == 0:
            losses = estimate_loss()
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val:
                best_val = losses["val"]
                if step > 0:
                    save_checkpoint(model, optimizer, Path(out_dir) / "torch_ckpt.npz")
        loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.time()
        print(f"iter {step}: loss {loss.item():.4f}, time {(now - last) * 1000:.2f}ms")
        last = now
    print(f"final val loss {losses['val']:.4f}")


if __name__ == "__main__":
    run(sys.argv[1], *map(int, sys.argv[2:3]))
