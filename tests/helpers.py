"""Helpers shared by the test modules: analytic-versus-numerical gradient checks and small models."""

import numpy

from minillm import gradcheck
from minillm.model import GPT, GPTConfig


def gradient_errors(forward, backward, inputs, names, seed=0):
    """{name: relative error} of backward's gradients against finite differences, in float64.

    forward(**inputs) -> (out, cache); backward(R, cache) -> the gradients of the
    inputs named in `names`, in that order. The objective is L = sum(out * R) with a
    fixed random R (a 0-d R for a scalar out, e.g. a loss), so dL/dout = R.
    Each input is perturbed in place by gradcheck's finite differences and restored.
    """
    out, cache = forward(**inputs)
    R = numpy.random.default_rng(seed).normal(size=numpy.shape(out))
    analytic = backward(R, cache)
    analytic = analytic if isinstance(analytic, (tuple, list)) else (analytic,)
    assert len(analytic) == len(names), f"backward returned {len(analytic)} gradients for {names}"
    errors = {}
    for name, grad in zip(names, analytic):
        assert grad is not None, f"d{name} is None"
        assert grad.shape == inputs[name].shape, f"d{name}: shape {grad.shape} != {inputs[name].shape}"
        errors[name] = gradcheck.gradient_error(grad, lambda: (forward(**inputs)[0] * R).sum(), inputs[name])
    return errors


def assert_gradients_match(forward, backward, inputs, names, seed=0):
    errors = gradient_errors(forward, backward, inputs, names, seed)
    bad = {name: f"{e:.2e}" for name, e in errors.items() if not e <= gradcheck.TOLERANCE}
    assert not bad, f"relative errors above {gradcheck.TOLERANCE}: {bad}"


def tiny_model(dtype="float64", seed=0, randomize=True, **config):
    """A small GPT; with `randomize`, weights ~ N(0, 0.5^2) (no unit gains or zero biases)."""
    options = dict(vocab_size=7, block_size=5, n_layer=1, n_head=2, n_embd=6) | config
    model = GPT(GPTConfig(**options), seed=seed, dtype=dtype)
    if randomize:
        gradcheck.randomize(model.params, seed)
    return model


def random_tokens(vocab_size, shape, seed):
    return numpy.random.default_rng(seed).integers(0, vocab_size, size=shape)
