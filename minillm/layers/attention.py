"""Causal multi-head self-attention, all heads batched.

Shapes:   x: (B, T, C)   w_attn: (C, 3C)   b_attn: (3C,) or None   w_proj: (C, C)   b_proj: (C,) or None
          n_head heads of size hs = C / n_head; out: (B, T, C)

forward:  qkv = x @ w_attn + b_attn                          (B, T, 3C)   linear
          q, k, v = split(qkv)                               each (B, T, C)
          q, k, v -> (B, n_head, T, hs)                      (split the channels into heads)
          S  = q @ k^T / sqrt(hs) + M                        (B, n_head, T, T)
               M[t, u] = 0 for u <= t and -inf for u > t: a position sees only
               itself and the past, and exp(-inf) = 0 excludes the future exactly
          P  = softmax(S)                                    each row sums to 1: the attention
               weights, how query t shares its attention among the keys 0..t
          Pd = dropout(P)
          Y  = Pd @ v                                        (B, n_head, T, hs)
          y  = Y -> (B, T, C)                                (merge: heads side by side again)
          out = y @ w_proj + b_proj                          linear

backward: the same lines in reverse, each differentiated on its own:
          dy, dw_proj, db_proj = linear.backward(dout)
          dY  = dy -> (B, n_head, T, hs)                     (the merge only moves numbers)
          dPd = dY @ v^T          dv = Pd^T @ dY             (Y = Pd v: a matrix product, as in linear)
          dP  = dropout.backward(dPd)
          dS  = softmax.backward(dP)                         (0 wherever P is 0: the mask needs no gradient)
          dq  = dS @ k / sqrt(hs) dk = dS^T @ q / sqrt(hs)   (S = q k^T / sqrt(hs): S_tu = q_t . k_u / sqrt(hs))
          dqkv = concat(dq, dk, dv), heads merged            (B, T, 3C)
          dx, dw_attn, db_attn = linear.backward(dqkv)
          weight_grads=False (frozen weights) skips the four weight and bias gradients.

decoding with a key/value cache (inference only: no backward):
          A position's k and v depend only on it and on earlier positions, so they
          never change once computed. With `kv_cache` holding them for the first
          `past` positions, x holds only the T new positions past..past+T-1:
          K, V = cached k, v followed by the new k, v        (B, n_head, past + T, hs)
          S    = q @ K^T / sqrt(hs) + M                      (B, n_head, T, past + T)
                 M[t, u] = -inf for u > past + t: the query at position past + t sees
                 keys 0..past + t, the same keys as in the full forward
          and the rest as above. Each new token then costs attention over past + 1
          keys and the matrix products of one row, not a pass over all past + 1 positions.
"""

import math

from minillm.backend import get_array_module
from minillm.layers import dropout, linear, softmax


def split_heads(a, n_head):
    """(B, T, C) -> (B, n_head, T, C / n_head)"""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(a):
    """(B, n_head, T, hs) -> (B, T, n_head * hs), the inverse of split_heads."""
    B, n_head, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, n_head * hs)


def causal_mask(T, past, dtype, xp):
    """(T, past + T) additive mask for T queries that follow `past` earlier positions.

    Query t (at position past + t) sees keys 0..past + t: 0 there, -inf after.
    With past = 0 it is the square mask: 0 on and below the diagonal, -inf above.
    """
    return xp.triu(xp.full((T, past + T), -xp.inf, dtype=dtype), k=past + 1)


class KVCache:
    """One attention layer's keys and values for the positions decoded so far.

    k, v: (B, n_head, length, hs); each append concatenates the new positions
    onto them. At most `capacity` positions fit.
    """

    def __init__(self, batch_size, n_head, capacity, head_size, dtype, xp):
        self.capacity = capacity
        self.k = xp.zeros((batch_size, n_head, 0, head_size), dtype=dtype)
        self.v = xp.zeros((batch_size, n_head, 0, head_size), dtype=dtype)
        self.length = 0  # the number of positions held

    def append(self, k, v):
        """Add the new positions' k, v (B, n_head, T, hs); return the keys and values of all positions."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"{end} positions do not fit a key/value cache of {self.capacity}")
        xp = get_array_module(k)
        self.k = xp.concatenate([self.k, k], axis=2)
        self.v = xp.concatenate([self.v, v], axis=2)
        self.length = end
        return self.k, self.v

    def clear(self):
        """Forget every position."""
        self.k = self.k[:, :, :0]
        self.v = self.v[:, :, :0]
        self.length = 0


def forward(x, w_attn, b_attn, w_proj, b_proj, n_head, dropout_p=0.0, rng=None, kv_cache=None, keep_weights=None):
    """`rng` (a backend.RNG) draws the attention-dropout mask; None switches it off.

    With a `kv_cache` (a KVCache), x holds the positions after the cached ones;
    their keys and values are appended to it, and the returned cache is None:
    this path is for inference and keeps nothing for a backward pass.
    `keep_weights`, a list, gets P (B, n_head, T, past + T) appended: the attention
    weights this pass used, for looking inside the model (minillm/inspect.py).
    """
    xp = get_array_module(x)
    C = x.shape[-1]
    if C % n_head:
        raise ValueError(f"n_embd {C} is not divisible by n_head {n_head}")
    hs = C // n_head

    qkv, qkv_cache = linear.forward(x, w_attn, b_attn)
    q, k, v = (split_heads(a, n_head) for a in xp.split(qkv, 3, axis=-1))
    if kv_cache is not None:
        k, v = kv_cache.append(k, v)
    T, past = x.shape[1], k.shape[2] - x.shape[1]
    S = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs) + causal_mask(T, past, x.dtype, xp)
    P, softmax_cache = softmax.forward(S)
    if keep_weights is not None:
        keep_weights.append(P)
    Pd, dropout_cache = dropout.forward(P, dropout_p, rng)
    Y = Pd @ v
    y = merge_heads(Y)
    out, proj_cache = linear.forward(y, w_proj, b_proj)
    if kv_cache is not None:
        return out, None
    return out, (qkv_cache, q, k, v, Pd, softmax_cache, dropout_cache, proj_cache)


def backward(dout, cache, weight_grads=True):
    """Returns (dx, dw_attn, db_attn, dw_proj, db_proj)."""
    qkv_cache, q, k, v, Pd, softmax_cache, dropout_cache, proj_cache = cache
    xp = get_array_module(dout)
    n_head, hs = q.shape[1], q.shape[3]
    dy, dw_proj, db_proj = linear.backward(dout, proj_cache, weight_grads)  # out = y @ w_proj + b_proj
    dY = split_heads(dy, n_head)                                            # y = merge_heads(Y)
    dPd = dY @ v.transpose(0, 1, 3, 2)                                      # Y = Pd @ v
    dv = Pd.transpose(0, 1, 3, 2) @ dY                                      # Y = Pd @ v
    dP = dropout.backward(dPd, dropout_cache)                               # Pd = dropout(P)
    dS = softmax.backward(dP, softmax_cache)                                # P = softmax(S)
    dq = dS @ k / math.sqrt(hs)                                             # S = q @ k^T / sqrt(hs) + M
    dk = dS.transpose(0, 1, 3, 2) @ q / math.sqrt(hs)                       # S = q @ k^T / sqrt(hs) + M
    dqkv = xp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)  # q, k, v = split(qkv)
    dx, dw_attn, db_attn = linear.backward(dqkv, qkv_cache, weight_grads)   # qkv = x @ w_attn + b_attn
    return dx, dw_attn, db_attn, dw_proj, db_proj
