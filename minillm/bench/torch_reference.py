"""The same GPT in PyTorch eager mode, for side-by-side timing (PyTorch is optional, never required).

Same architecture as minillm.model: pre-LayerNorm blocks, tanh-GELU MLP, causal
attention, tied LM head, AdamW; the same shapes and the same thread count.

It runs in a process of its own, as a PyTorch user's training would, with
PyTorch's own allocator and thread settings, untouched by minillm's:

    python -m minillm.bench.torch_reference CONFIG THREADS

builds the benchmark configuration CONFIG (bench/configs.py, the one minillm's side
times too), then for each line it reads runs one training step ("step") or the step's
matrix products alone ("products"), and answers with a line of its own. TorchProcess drives it.
"""

import math
import subprocess
import sys

import numpy
import torch
from torch import nn
from torch.nn import functional as F

from minillm.bench.configs import CONFIGS, benchmark_tokens
from minillm.bench.roofline import product_operands


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (a.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config.n_embd, config.n_head) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        gpt2_init(self, config.n_layer)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def gpt2_init(model, n_layer):
    """GPT-2's initialisation, as minillm's model.init_params: N(0, 0.02^2) weights, std 0.02 / sqrt(2 n_layer)
    for the projections into the residual stream, zero biases, LayerNorm gains 1.

    PyTorch's own defaults (N(0, 1) embeddings) would give logits so large that the softmax's
    probabilities fall below float32's normal range, and arithmetic on such subnormal numbers
    ran PyTorch's `baby` step at about twice its time (BENCHMARKS.md, "Training").
    """
    for name, p in model.named_parameters():
        if p.dim() < 2:
            nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
        else:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)


def training_step(config, idx, threads):
    """A function that runs one PyTorch training step (forward, backward, AdamW) on idx."""
    torch.set_num_threads(threads)
    model = TorchGPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.from_numpy(idx)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(idx, idx).backward()
        optimizer.step()

    return step


def products_alone(config, batch_size, threads):
    """A function that runs one training step's matrix products alone with PyTorch's matmul.

    The products and operands of minillm's ProductsReplay (bench/roofline.py), the whole batch
    at once on PyTorch's threads: what is left of PyTorch's step without them is its other work,
    its compiled layers (one kernel per layer), copies and AdamW. Attention's products are replayed
    over minillm's causal blocks, the same FLOPs as PyTorch's fused attention kernel computes inside it.
    """
    torch.set_num_threads(threads)
    operands = [(*(torch.from_numpy(x) for x in (a, b, out)), runs)
                for a, b, out, runs in product_operands(config, batch_size, numpy.random.default_rng(0))]

    def products():
        for a, b, out, runs in operands:
            for _ in range(runs):
                torch.matmul(a, b, out=out)

    return products


class TorchProcess:
    """A PyTorch training process for one benchmark configuration; step() runs one step in it and waits."""

    def __init__(self, config_name, threads):
        command = [sys.executable, "-m", "minillm.bench.torch_reference", config_name, str(threads)]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def step(self):
        self._ask("step")

    def products(self):
        """The step's matrix products alone (products_alone), in the same process."""
        self._ask("products")

    def _ask(self, command):
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        if not self._process.stdout.readline():
            raise RuntimeError("the PyTorch benchmark process ended unexpectedly")

    def close(self):
        self._process.stdin.close()
        self._process.wait()


def serve(config_name, threads):
    config, batch_size, _ = CONFIGS[config_name]
    run = {"step": training_step(config, benchmark_tokens(config, batch_size), threads),
           "products": products_alone(config, batch_size, threads)}
    for line in sys.stdin:
        run[line.strip()]()
        print("done", flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
