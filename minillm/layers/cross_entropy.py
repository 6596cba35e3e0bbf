"""Softmax cross-entropy over the vocabulary, averaged over the counted targets.

Shapes:   logits: (..., V)   targets: (...) integer ids, or IGNORE_INDEX to skip
          loss: scalar (0-d array)
          Below, z is the logits flattened to N = prod(...) rows of V, y the targets to N ids.

forward:  per row, with m = max_j z_j (no overflow in exp):
          p          = softmax(z) = exp(z - m) / sum_j exp(z_j - m)
          loss_row   = -log p_y = log(sum_j exp(z_j - m)) - (z_y - m)     (= logsumexp(z) - z_y)
          loss       = sum of loss_row over counted rows / n_counted
          (n_counted = number of targets != IGNORE_INDEX; with none, the loss is 0)

backward: d loss_row / d z_j = p_j - [j == y]                  (d logsumexp / d z_j = p_j; d z_y / d z_j = [j == y])
          dlogits = dloss * (p - onehot(y)) / n_counted      on counted rows
          dlogits = 0                                        on ignored ones
"""

from minillm.backend import get_array_module

IGNORE_INDEX = -1


def forward(logits, targets, ignore_index=IGNORE_INDEX):
    xp = get_array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    y = targets.reshape(-1)
    counted = y != ignore_index
    y_safe = xp.where(counted, y, 0)  # any valid id; the ignored rows get weight 0 below
    rows = xp.arange(y.shape[0])

    shifted = z - z.max(axis=-1, keepdims=True)                 # z - m
    exp = xp.exp(shifted)
    sum_exp = exp.sum(axis=-1)
    loss_row = xp.log(sum_exp) - shifted[rows, y_safe]
    weight = counted.astype(logits.dtype)                       # 1 for counted rows, 0 for ignored
    n_counted = xp.maximum(weight.sum(), 1.0)
    loss = (loss_row * weight).sum() / n_counted

    p = exp / sum_exp[:, None]                                  # softmax(z), for the backward pass
    return loss, (p, rows, y_safe, weight, n_counted, logits.shape)


def backward(dloss, cache):
    """Returns dlogits (targets have no gradient)."""
    p, rows, y_safe, weight, n_counted, shape = cache
    xp = get_array_module(p)
    onehot = xp.zeros_like(p)
    onehot[rows, y_safe] = 1.0
    dloss_row = weight * (dloss / n_counted)                    # loss = sum(loss_row * weight) / n_counted
    dlogits = (p - onehot) * dloss_row[:, None]                 # loss_row = logsumexp(z) - z_y
    return dlogits.reshape(shape)
