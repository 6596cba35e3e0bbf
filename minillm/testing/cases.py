"""minillm's own layers, and the model's block, as ready check_layer calls at given sizes.

    case = cases.layer_case("layernorm", minillm.layers.layernorm, cases.Sizes(batch=1), seed=0)
    case.check().assert_ok()

`module` is any module with that layer's forward and backward (the reference, the fast twin, or a
learner's own). The inputs are random normals, with the conditioning each layer needs:

- LayerNorm gets at least 3 features (width + 2) around a non-zero mean. With 2, x_hat is +-1 up to
  eps, its gradient ~1e-7 while L ~ 1, below what a float64 finite difference resolves; with 1 it
  is 0. (tests/test_layers_grad.py checks those two against their closed forms instead.)
- softmax gets width + 1 entries: over one entry its output is 1 whatever the input.
- cross-entropy ignores about a third of the targets (IGNORE_INDEX) but never all of them.
- embedding repeats a token whenever there are two positions (the scatter-add must add repeats), and
  wpe has a position more than the sequence uses (its gradient there must be 0).
- dropout masks keep their first element: a mask that dropped every element of a small input would
  leave nothing to check (see KeepsFirst).
"""

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy

from minillm import backend
from minillm.layers.cross_entropy import IGNORE_INDEX
from minillm.testing.check import check_layer
from minillm.testing.numeric import TOLERANCE

LAYER_NAMES = ("linear", "gelu", "softmax", "layernorm", "cross_entropy", "embedding", "dropout", "lora", "mlp",
               "attention")
# The block's weights under their names in minillm.model.block_forward's dict, without the block prefix.
BLOCK_WEIGHTS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias")


@dataclass(frozen=True)
class Sizes:
    batch: int = 2
    time: int = 3
    n_head: int = 2
    head_size: int = 2
    vocab: int = 5
    bias: bool = True

    @property
    def width(self):
        return self.n_head * self.head_size


class Case(NamedTuple):
    """The arguments of one check_layer call."""

    forward: Callable
    backward: Callable
    inputs: tuple
    kwargs: dict
    names: Any = None

    def on(self, device):
        """The same case with its arrays and generators on `device` ("cpu" or "cuda")."""
        move = lambda value: backend.to_device(value, device) if hasattr(value, "shape") else value
        kwargs = {key: type(value)(value.seed, device) if isinstance(value, backend.RNG) else value
                  for key, value in self.kwargs.items()}
        return self._replace(inputs=tuple(move(value) for value in self.inputs), kwargs=kwargs)

    def check(self, tolerance=TOLERANCE, seed=0):
        return check_layer(self.forward, self.backward, self.inputs, kwargs=self.kwargs, seed=seed,
                           tolerance=tolerance, names=self.names)


class KeepsFirst(backend.RNG):
    """A dropout generator whose every uniform draw has its first element just below 1, so a mask keeps
    that element whatever p: at batch 1, time 1 and one head, attention's weights are a single element,
    which p = 0.3 would drop in three draws out of ten. check_layer re-creates it before every forward."""

    def uniform(self, shape, dtype):
        u = super().uniform(shape, dtype)
        u.reshape(-1)[:1] = 1.0 - 1e-6
        return u


def layer_case(name, module, sizes, seed, dropout_p=0.0):
    """The Case of layer `name` (one of LAYER_NAMES) on `module`'s forward and backward.

    dropout_p: the probability of the dropout layer and of attention's dropout (their generator is
    seeded with `seed`, and check_layer draws the same masks in every evaluation).
    """
    rng = numpy.random.default_rng(seed)
    normal = lambda *shape, scale=1.0: rng.normal(size=shape) * scale
    bias = lambda *shape: normal(*shape) if sizes.bias else None
    B, T, C, V = sizes.batch, sizes.time, sizes.width, sizes.vocab
    case = lambda inputs, **kwargs: Case(module.forward, module.backward, tuple(inputs), kwargs)
    if name == "linear":
        return case([normal(B, T, C), normal(C, V), bias(V)])
    if name == "gelu":
        return case([normal(B, T, C, scale=2.0)])
    if name == "softmax":
        return case([normal(B, T, C + 1, scale=2.0)])
    if name == "layernorm":
        return case([normal(B, T, C + 2, scale=2.0) + 1.0, normal(C + 2), bias(C + 2)])
    if name == "cross_entropy":
        targets = rng.integers(0, V, size=(B, T))
        ignored = rng.random(size=(B, T)) < 1 / 3
        ignored.flat[0] = False
        targets[ignored] = IGNORE_INDEX
        return case([normal(B, T, V, scale=2.0), targets])
    if name == "embedding":
        idx = rng.integers(0, V, size=(B, T))
        idx.flat[-1] = idx.flat[0]
        return case([idx, normal(V, C), normal(T + 1, C)])
    if name == "dropout":
        return case([normal(B, T, C)], p=dropout_p, rng=KeepsFirst(seed, "cpu"))
    if name == "lora":
        rank = sizes.n_head
        return case([normal(C, V), normal(C, rank), normal(rank, V)], scale=sizes.head_size / rank)
    if name == "mlp":
        return case([normal(B, T, C), normal(C, 4 * C), bias(4 * C), normal(4 * C, C), bias(C)])
    if name == "attention":
        inputs = [normal(B, T, C), normal(C, 3 * C, scale=0.5), bias(3 * C), normal(C, C), bias(C)]
        return case(inputs, n_head=sizes.n_head, dropout_p=dropout_p, rng=KeepsFirst(seed, "cpu"))
    raise ValueError(f"no layer case {name!r}: the layers are {', '.join(LAYER_NAMES)}")


class TrainEverything:
    """The `tuning` of block_backward for a model with nothing frozen: every weight gradient is wanted."""

    @staticmethod
    def wants(*names):
        return True


def block_case(block_forward, block_backward, layers, sizes, seed, dropout_p=0.0):
    """The Case of one transformer block: block_forward and block_backward with the signatures of
    minillm.model's, run on the layer modules of `layers`; its inputs are x and the block's weights.

    The width is at least 3, for the block's LayerNorms (see the module docstring).
    """
    rng = numpy.random.default_rng(seed)
    n_head = sizes.n_head
    head_size = max(sizes.head_size, -(-3 // n_head))
    C = n_head * head_size
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
              "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
              "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
              "mlp.c_proj.bias": (C,)}
    names = [name for name in BLOCK_WEIGHTS if sizes.bias or not name.endswith(".bias")]
    weights = [rng.normal(size=shapes[name]) * 0.5 for name in names]
    x = rng.normal(size=(sizes.batch, sizes.time, C))

    def forward(x, *weights, rng):
        return block_forward(layers, x, dict(zip(names, weights)), "", n_head, dropout_p, rng)

    def backward(dout, cache):
        dx, grads = block_backward(layers, dout, cache, "", TrainEverything())
        return (dx, *(grads.get(name) for name in names))

    forward.__module__, forward.__qualname__ = block_forward.__module__, block_forward.__qualname__

    return Case(forward, backward, (x, *weights), {"rng": KeepsFirst(seed, "cpu")}, ["x", *names])
