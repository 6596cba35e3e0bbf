"""Softmax cross-entropy over the vocabulary, averaged over the counted targets.

Shapes:   logits: (..., V)   targets: (...) integer ids, or IGNORE_INDEX to skip
          loss: scalar (0-d array)

forward:  with z = logits of one position and y its target,
          logsumexp(z) = m + log(sum_j exp(z_j - m))         with m = max_j z_j (no overflow)
          loss_pos     = logsumexp(z) - z_y
          loss         = sum of loss_pos over counted positions / n_counted
          (n_counted = number of targets != IGNORE_INDEX; with none, the loss is 0)

backward: dloss_pos/dz_j = softmax(z)_j - [j == y], so
          dlogits = dloss * (softmax(z) - onehot(y)) / n_counted   on counted positions
          dlogits = 0                                              on ignored ones
"""

from minillm.backend import get_array_module

IGNORE_INDEX = -1


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
