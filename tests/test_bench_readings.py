"""Each "without" row of minillm.bench.readings really runs the reference's code inside a training step.

A row that patched a name nobody calls would time the all-fast step under another label.
Here every patched value is wrapped in a spy, one tiny training step runs under the row's
patches, and each spy must have been called; afterwards the fast functions are back.
"""

import numpy
import pytest

from minillm.bench import readings
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW
from minillm.readback import NonfiniteWatch
from minillm.training import TrainConfig, train_step


def tiny_step():
    model = GPT(GPTConfig(vocab_size=7, block_size=6, n_layer=1, n_head=2, n_embd=8), seed=0)
    optimizer = AdamW(model.params)
    idx = numpy.random.default_rng(0).integers(0, 7, (2, 6))
    watch = NonfiniteWatch("cpu", model.dtype, out_dir=None)
    return lambda: train_step(model, optimizer, lambda rng: (idx, idx), 0, TrainConfig(), watch)


@pytest.mark.parametrize("trick", list(readings.TRICKS))
def test_the_row_calls_the_reference_in_the_step(trick):
    _, patches = readings.TRICKS[trick]
    calls = [0] * len(patches)

    def spy(i, value):
        def wrapper(*args, **kwargs):
            calls[i] += 1
            return value(*args, **kwargs)
        return wrapper

    before = [getattr(target, attribute) for target, attribute, _ in patches]
    spied = [(target, attribute, spy(i, value)) for i, (target, attribute, value) in enumerate(patches)]
    readings.without(tiny_step(), spied)()
    assert all(calls), f"{trick}: patched functions never called: {calls}"
    assert [getattr(target, attribute) for target, attribute, _ in patches] == before
