"""Softmax cross-entropy, tuned: the numbers of minillm/layers/cross_entropy.py, which has the equations.

What it does differently: the probabilities are exp(z - m) divided in place, and the
backward turns a copy of them into dlogits in place (subtract 1 at the targets, then
scale), where the reference builds a one-hot matrix and fresh arrays for each step.
With V in the tens of thousands these (B T, V) arrays are the largest of a step.

What it buys in a whole training step: the `without: cross-entropy` row of `python -m minillm.bench.readings`
(BENCHMARKS.md, "Two readings"); the layer alone: BENCHMARKS.md, "The fast layers one at a time"."""

from minillm.backend import get_array_module
from minillm.layers.cross_entropy import IGNORE_INDEX


def forward(logits, targets, ignore_index=IGNORE_INDEX):
    xp = get_array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    y = targets.reshape(-1)
    counted = y != ignore_index
    y_safe = xp.where(counted, y, 0)  # any valid row index; these rows are masked out
    rows = xp.arange(y.shape[0])

    shifted = z - z.max(axis=-1, keepdims=True)
    exp = xp.exp(shifted)
    sum_exp = exp.sum(axis=-1)
    loss_pos = xp.log(sum_exp) - shifted[rows, y_safe]
    weight = counted.astype(logits.dtype)
    n_counted = xp.maximum(weight.sum(), 1.0)
    loss = (loss_pos * weight).sum() / n_counted

    probs = exp
    probs /= sum_exp[:, None]
    return loss, (probs, rows, y_safe, weight, n_counted, logits.shape)


def backward(dloss, cache):
    """Returns dlogits (targets have no gradient)."""
    probs, rows, y_safe, weight, n_counted, shape = cache
    dlogits = probs.copy()
    dlogits[rows, y_safe] -= 1.0
    dlogits *= (weight * (dloss / n_counted))[:, None]
    return dlogits.reshape(shape)
