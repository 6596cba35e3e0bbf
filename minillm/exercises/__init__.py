"""Exercises: write every backward pass of GPT-2 yourself, and have each one checked.

An exercise is one file, DIR/NAME.py (DIR is exercises/ unless --dir says otherwise). For a layer
(linear, gelu, softmax, layernorm, cross_entropy, embedding, mlp, attention) it is the reference
module from minillm/layers with its forward pass as it is and its backward pass left for you; for
`block`, the model's block_backward; for `adamw`, the optimiser's update. The loop:

    python -m minillm.exercises list              the exercises in reading order, and where you are
    python -m minillm.exercises start linear      writes exercises/linear.py
    (write backward in exercises/linear.py)
    python -m minillm.exercises check linear      checks it against finite differences, over many
                                                  shapes, and shows the first failure at its smallest
    python -m minillm.exercises hint linear [K]   the backward equations, one step at a time
    python train.py --layers-from exercises       trains on every layer of yours that passes

The check says which gradient is wrong, where, and what the mistake looks like when it is a familiar
one (a factor of 2, a transpose, a missing sum). Training with --layers-from uses each exercise that
passes and the reference for the others; from Python, learner_layers(DIR) gives the same layer set.
"""

from minillm.exercises.catalog import ExerciseError
from minillm.exercises.loading import learner_layers

__all__ = ["ExerciseError", "learner_layers"]
