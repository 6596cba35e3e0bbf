"""The exercises, in reading order: each layer's backward pass, then the block's, then AdamW's update.

An exercise is one file in the learner's directory, NAME.py. For a layer it is the reference module
(minillm/layers/NAME.py) with `backward` left blank; for `block`, the model's block_forward with
block_backward left blank; for `adamw`, adamw_update left blank under its equations.
"""

from dataclasses import dataclass
from pathlib import Path

import minillm.layers

PROG = "python -m minillm.exercises"
DEFAULT_DIR = "exercises"
LAYERS_DIR = Path(minillm.layers.__file__).parent


@dataclass(frozen=True)
class Exercise:
    name: str
    kind: str  # "layer", "block" or "adamw": how its file is made, checked and hinted
    summary: str

    def path(self, directory):
        return Path(directory) / f"{self.name}.py"

    @property
    def reference(self):
        """The reference source file of a layer exercise."""
        return LAYERS_DIR / f"{self.name}.py"


EXERCISES = [
    Exercise("linear", "layer", "x @ w + b: the matrix-product rule that every other layer reuses"),
    Exercise("gelu", "layer", "GPT-2's tanh GELU: one element at a time, by the chain and product rules"),
    Exercise("softmax", "layer", "softmax over the last axis: the Jacobian's product without the Jacobian"),
    Exercise("layernorm", "layer", "LayerNorm: dx directly, through the mean and through the variance"),
    Exercise("cross_entropy", "layer", "the loss: softmax cross-entropy averaged over the counted targets"),
    Exercise("embedding", "layer", "token plus position embedding: a scatter-add over repeated tokens"),
    Exercise("mlp", "layer", "the feed-forward block: linear, GELU, linear, in reverse"),
    Exercise("attention", "layer", "causal self-attention, given linear, softmax and dropout"),
    Exercise("block", "block", "the transformer block: its layer calls in reverse, the residuals added"),
    Exercise("adamw", "adamw", "AdamW's update: the moments, their bias correction, decoupled decay"),
]
BY_NAME = {exercise.name: exercise for exercise in EXERCISES}
NAMES = [exercise.name for exercise in EXERCISES]


class ExerciseError(ValueError):
    """An exercise that cannot be named, written, read or loaded; `status` is the command's exit status."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def get(name):
    """The Exercise called `name`; ExerciseError (a usage error) naming them all when there is none."""
    if name not in BY_NAME:
        raise ExerciseError(f"no exercise {name!r}: the exercises are {', '.join(NAMES)}", status=2)
    return BY_NAME[name]
