"""Causal multi-head self-attention, all heads batched.

Shapes:   x: (B, T, C)   w_attn: (C, 3C)   b_attn: (3C,)   w_proj: (C, C)   b_proj: (C,)
          n_head heads of size hs = C / n_head; out: (B, T, C)

forward:  q, k, v = split(x @ w_attn + b_attn)               each (B, T, C)
          q, k, v -> (B, n_head, T, hs)                      (split the channels into heads)
          S  = q @ k^T / sqrt(hs) + M                        (B, n_head, T, T)
               M[t, u] = 0 for u <= t and -inf for u > t: a position sees only
               itself and the past, and exp(-inf) = 0 excludes the future exactly
          P  = softmax(S)                                    each row sums to 1
          Pd = dropout(P)
          Y  = Pd @ v                                        (B, n_head, T, hs)
          y  = Y -> (B, T, C)                                (heads side by side again)
          out = y @ w_proj + b_proj

backward: dy, dw_proj, db_proj = linear.backward(dout)
          dY  = dy -> (B, n_head, T, hs)
          dPd = dY @ v^T          dv = Pd^T @ dY             (Y = Pd v)
          dP  = dropout.backward(dPd)
          dS  = softmax.backward(dP)                         (0 wherever P is 0: the mask)
          dq  = dS @ k / sqrt(hs) dk = dS^T @ q / sqrt(hs)   (S = q k^T / sqrt(hs))
          dx, dw_attn, db_attn = linear.backward(concat(dq, dk, dv) -> (B, T, 3C))
"""

import math

from minillm.backend import get_array_module
from minillm.layers import dropout, linear, softmax


def split_heads(a, n_head):
    """(B, T, C) -> (B, n_head, T, C / n_head)"""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(a):
    """(B, n_head, T, hs) -> (B, T, n_head * hs)"""
    B, n_head, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, n_head * hs)


def causal_mask(T, dtype, xp):
    """(T, T) additive mask: 0 on and below the diagonal, -inf above it."""
    return xp.triu(xp.full((T, T), -xp.inf, dtype=dtype), k=1)


def forward(x, w_attn, b_attn, w_proj, b_proj, n_head, dropout_p=0.0, rng=None):
    """`rng` (a backend.RNG) draws the attention-dropout mask; None switches it off."""
    xp = get_array_module(x)
    C = x.shape[-1]
    if C % n_head:
        raise ValueError(f"n_embd {C} is not divisible by n_head {n_head}")
    scale = 1.0 / math.sqrt(C // n_head)

    qkv, qkv_cache = linear.forward(x, w_attn, b_attn)
    q, k, v = (split_heads(a, n_head) for a in xp.split(qkv, 3, axis=-1))
    S = (q @ k.transpose(0, 1, 3, 2)) * scale
    S += causal_mask(x.shape[1], x.dtype, xp)
    P, softmax_cache = softmax.forward(S)
    Pd, dropout_cache = dropout.forward(P, dropout_p, rng)
    y = merge_heads(Pd @ v)
    out, proj_cache = linear.forward(y, w_proj, b_proj)
    cache = (qkv_cache, q, k, v, Pd, softmax_cache, dropout_cache, proj_cache, scale)
    return out, cache


def backward(dout, cache):
    """Returns (dx, dw_attn, db_attn, dw_proj, db_proj)."""
    qkv_cache, q, k, v, Pd, softmax_cache, dropout_cache, proj_cache, scale = cache
    xp = get_array_module(dout)
    n_head = q.shape[1]

    dy, dw_proj, db_proj = linear.backward(dout, proj_cache)
    dY = split_heads(dy, n_head)
    dPd = dY @ v.transpose(0, 1, 3, 2)
    dv = Pd.transpose(0, 1, 3, 2) @ dY
    dP = dropout.backward(dPd, dropout_cache)
    dS = softmax.backward(dP, softmax_cache)
    dS *= scale
    dq = dS @ k
    dk = dS.transpose(0, 1, 3, 2) @ q
    dqkv = xp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)
    dx, dw_attn, db_attn = linear.backward(dqkv, qkv_cache)
    return dx, dw_attn, db_attn, dw_proj, db_proj
