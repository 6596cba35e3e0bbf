"""The training benchmarks' configurations and tokens, which minillm's step and PyTorch's share.

bench/training.py and bench/scaling.py time minillm on them; bench/torch_reference.py, in a
process of its own, builds the same model in PyTorch and trains it on the same tokens.
"""

import numpy

from minillm.model import GPTConfig

CONFIGS = {
    # name: (model, batch size, timed steps)
    "baby": (GPTConfig(vocab_size=103, block_size=64, n_layer=4, n_head=4, n_embd=128), 12, 41),
    "small": (GPTConfig(vocab_size=103, block_size=256, n_layer=6, n_head=6, n_embd=384), 8, 15),
    "gpt2": (GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), 1, 5),
}


def benchmark_tokens(config, batch_size):
    """The (batch_size, block_size) token ids that both minillm and PyTorch train on."""
    return numpy.random.default_rng(0).integers(0, config.vocab_size, (batch_size, config.block_size))
