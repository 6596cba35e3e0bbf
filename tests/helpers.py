"""Helpers shared by the test modules: small models and random tokens."""

import numpy

from minillm import gradcheck
from minillm.model import GPT, GPTConfig


def tiny_model(dtype="float64", seed=0, randomize=True, **config):
    """A small GPT; with `randomize`, weights ~ N(0, 0.5^2) (no unit gains or zero biases)."""
    options = dict(vocab_size=7, block_size=5, n_layer=1, n_head=2, n_embd=6) | config
    model = GPT(GPTConfig(**options), seed=seed, dtype=dtype)
    if randomize:
        gradcheck.randomize(model.params, seed)
    return model


def random_tokens(vocab_size, shape, seed):
    return numpy.random.default_rng(seed).integers(0, vocab_size, size=shape)
