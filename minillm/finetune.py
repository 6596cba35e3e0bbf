"""Fine-tuning: frozen parameters and LoRA adapters, kept out of the model's forward and backward.

A GPT trains every parameter unless told otherwise, in two ways:

    model.frozen = {"wte.weight", ...}     these parameters get no gradient (and no optimizer state)
    config.lora_rank = r > 0               the chosen projections get LoRA adapters (layers/lora.py):
                                           h.{i}.attn.c_attn.lora_a (C, r) and .lora_b (r, 3C), ...

The model's forward and backward see both through one object, a `Tuning`, made at the
start of every forward pass (`Tuning(model)`):

    tuning.weights        the weights the pass uses: the parameters, with every adapted
                          weight w replaced by w + (alpha / r) a @ b
    tuning.wants(name)    whether backward must form this weight's gradient at all
    tuning.lowest_block   backward stops below this block: nothing under it trains
    tuning.gradients(g)   the weights' gradients -> the trainable parameters' gradients
                          (an adapted weight's gradient becomes its adapters')

For a model with nothing frozen and no adapters the Tuning changes nothing: weights are
the parameters themselves, every gradient is wanted, backward runs to the embeddings.

Adding and removing adapters makes a new model on the same arrays:

    adapted = with_lora(model, rank=8)    adapters on the attention projections; only they train
    plain = merged(adapted)               adapters folded into the weights: the same logits

A model with adapters forms its adapted weights at every forward and decode call: merge it
before sampling many tokens. This module builds models as type(model)(...): the model's
module imports this one, so this one does not import it.
"""

import math
from dataclasses import replace

from minillm import backend, memory
from minillm.errors import ConfigError
from minillm.layers import lora

# The projections each --lora-targets part adapts, in every block.
LORA_TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
ADAPTERS = ("lora_a", "lora_b")


def adapted_layers(config):
    """Names of the linear layers with LoRA adapters (none when lora_rank is 0)."""
    if not config.lora_rank:
        return []
    short = [name for part in config.lora_targets.split(",") for name in LORA_TARGETS[part]]
    return [f"h.{i}.{name}" for i in range(config.n_layer) for name in short]


def adapter_shapes(config, shapes):
    """name -> shape of every adapter, given the shapes of the weights they adapt."""
    adapters = {}
    for layer in adapted_layers(config):
        n_in, n_out = shapes[layer + ".weight"]
        adapters[layer + ".lora_a"] = (n_in, config.lora_rank)
        adapters[layer + ".lora_b"] = (config.lora_rank, n_out)
    return adapters


def init_adapters(config, weights, rng, dtype):
    """{name: array} of fresh adapters for the config's adapted layers, whose weights are in `weights`.

    a ~ N(0, 1 / n_in), so x @ a keeps the scale of x, and b = 0, so the adapted weight starts
    equal to the one it adapts. Drawn in the order of adapter_shapes, from `rng`.
    """
    shapes = adapter_shapes(config, {name: weight.shape for name, weight in weights.items()})
    memory.check_fits(
        sum(math.prod(shape) for shape in shapes.values()) * backend.dtype_of(dtype).itemsize,
        f"LoRA adapters of rank {config.lora_rank} on {config.lora_targets}", "choose a smaller rank",
    )
    return {
        name: rng.normal(shape, 1.0 / math.sqrt(shape[0]), dtype) if name.endswith("lora_a")
        else rng.xp.zeros(shape, dtype=dtype)
        for name, shape in shapes.items()
    }


def with_lora(model, rank, alpha=8.0, targets="attn", seed=0):
    """A model with `model`'s weights plus fresh LoRA adapters, in which only the adapters train.

    The new model shares `model`'s arrays. Its adapters start with b = 0, so its logits
    equal `model`'s until they are trained.
    """
    if model.config.lora_rank:
        raise ConfigError("this model already has LoRA adapters; merge them first (finetune.merged)")
    config = replace(model.config, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    adapters = init_adapters(config, model.params, backend.RNG(seed, model.device), model.dtype)
    adapted = type(model)(config, seed=seed, dtype=model.dtype, device=model.device, params=model.params | adapters,
                          layers=model.layers)
    adapted.frozen = set(model.params)
    return adapted.train(model.training)


def merged(model):
    """A plain model (no adapters) whose weights are the adapted ones, w + (alpha / r) a @ b.

    It computes the very same weights as the adapted model's forward pass, so its logits
    are identical. Weights without adapters are shared, not copied. A model without
    adapters is returned as it is.
    """
    if not model.config.lora_rank:
        return model
    weights, _ = adapted_weights(model.config, model.params)
    params = {name: weight for name, weight in weights.items() if not name.endswith(ADAPTERS)}
    plain = type(model)(replace(model.config, lora_rank=0), dtype=model.dtype, device=model.device, params=params,
                        layers=model.layers)
    return plain.train(model.training)


def adapted_weights(config, params):
    """(the weights a forward pass uses, {layer: lora cache}): each adapted weight w becomes
    lora.forward(w, a, b, alpha / r); without adapters, `params` itself."""
    layers = adapted_layers(config)
    if not layers:
        return params, {}
    scale = config.lora_alpha / config.lora_rank
    weights, caches = dict(params), {}
    for layer in layers:
        w, a, b = (params[f"{layer}.{kind}"] for kind in ("weight",) + ADAPTERS)
        weights[f"{layer}.weight"], caches[layer] = lora.forward(w, a, b, scale)
    return weights, caches


def block_index(name):
    """The block of a parameter named h.{i}.... (h.3.ln_1.weight -> 3)."""
    return int(name.split(".")[1])


class Tuning:
    """What fine-tuning changes in one forward and backward pass of `model` (see the module docstring)."""

    def __init__(self, model):
        self.weights, lora_caches = adapted_weights(model.config, model.params)
        self._trainable = [name for name in model.params if name not in model.frozen]
        # An adapted weight's gradient is wanted when its adapters train: lora.backward turns it into theirs.
        self._trained_adapters = {
            layer: cache for layer, cache in lora_caches.items()
            if any(f"{layer}.{kind}" in self._trainable for kind in ADAPTERS)
        }
        self._wanted = set(self._trainable) | {f"{layer}.weight" for layer in self._trained_adapters}
        if self.wants("wte.weight", "wpe.weight"):
            self.lowest_block = 0
        else:
            blocks = [block_index(name) for name in self._wanted if name.startswith("h.")]
            self.lowest_block = min(blocks, default=model.config.n_layer)

    def wants(self, *names):
        """True when backward must form the gradient of at least one of these weights."""
        return not self._wanted.isdisjoint(names)

    def gradients(self, grads):
        """{trainable parameter: gradient}, in the parameters' order, from the weights' gradients."""
        for layer, cache in self._trained_adapters.items():
            w_name, a_name, b_name = (f"{layer}.{kind}" for kind in ("weight",) + ADAPTERS)
            grads[w_name], grads[a_name], grads[b_name] = lora.backward(grads[w_name], cache)
        return {name: grads[name] for name in self._trainable}
