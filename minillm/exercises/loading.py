"""A learner's layers as a layer set for the model: `python train.py --layers-from DIR`.

    found = learner_layers("exercises")
    model = GPT(config, layers=found.layers)        # embedding, dropout, layernorm, attention, mlp, linear,
                                                    # cross_entropy and block_backward
    optimizer = AdamW(params, update=found.adamw_update)   # None: the usual update

Only the exercises whose files pass `check` are used; the reference stands in for every other one
(found.not_used says why: "not started", or "failing: <what>"). The composite layers call the chosen
simple ones: attention and mlp, the learner's or the reference's, are fresh copies of their module
whose module-level linear, softmax, gelu and dropout are rebound to the layer set's, so a learner's
linear is the one every projection runs, and the block is run with the layer set it is given.
"""

import types
from dataclasses import dataclass, field
from pathlib import Path

import minillm.layers
import minillm.model
from minillm.exercises import checking, modules
from minillm.exercises.catalog import BY_NAME, EXERCISES, LAYERS_DIR, PROG, ExerciseError

SIMPLE = ("linear", "gelu", "softmax", "layernorm", "cross_entropy", "embedding")
COMPOSITE = ("mlp", "attention")
# The names a composite layer's module imports from minillm.layers.
PARTS = ("linear", "softmax", "gelu", "dropout")
# The layer modules the model calls (GPT(..., layers=...)), besides block_backward.
LAYER_SET = ("embedding", "dropout", "layernorm", "attention", "mlp", "linear", "cross_entropy")


@dataclass
class LearnerLayers:
    """What learner_layers found: the layer set, the AdamW update, and which exercises are the learner's."""

    layers: types.SimpleNamespace
    adamw_update: object = None
    theirs: list = field(default_factory=list)
    not_used: dict = field(default_factory=dict)


def learner_layers(directory):
    """The layer set of the exercises in `directory` that pass their check, the reference's for the rest.

    A missing directory is an ExerciseError. Checks run only for files changed since their last check
    (see checking.status).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ExerciseError(f"{directory} is not a folder of exercises ({PROG} start linear --dir {directory} "
                            "begins one)")
    found = LearnerLayers(types.SimpleNamespace())
    passed = set()
    for exercise in EXERCISES:
        status, reason = checking.status(exercise, directory)
        if status == "passed":
            passed.add(exercise.name)
            found.theirs.append(exercise.name)
        else:
            found.not_used[exercise.name] = status if status == "not started" else f"{status}: {reason}"

    def theirs(name):
        path = BY_NAME[name].path(directory)
        try:
            return modules.load(path, str(path))
        except modules.LearnerError as err:  # the file changed since it passed
            raise ExerciseError(err.lines[0]) from None

    chosen = {"dropout": minillm.layers.dropout}
    for name in SIMPLE:
        chosen[name] = theirs(name) if name in passed else getattr(minillm.layers, name)
    for name in COMPOSITE:
        module = theirs(name) if name in passed else modules.load(LAYERS_DIR / f"{name}.py", name=f"_reference_{name}")
        for part in PARTS:
            if hasattr(module, part):
                setattr(module, part, chosen[part])
        chosen[name] = module
    block_backward = theirs("block").block_backward if "block" in passed else minillm.model.block_backward
    found.layers = types.SimpleNamespace(**{name: chosen[name] for name in LAYER_SET}, block_backward=block_backward)
    found.adamw_update = theirs("adamw").adamw_update if "adamw" in passed else None
    return found
