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
          weight_grads=False (frozen weights) skips the four weight and bias gradients.

causal blocks: the queries are taken query_block at a time. Block [a, b) is S, P and Y
          for rows a..b-1 and needs only the keys 0..b-1, as the later ones are masked out:
          S_ab = q[a:b] @ k[:b]^T / sqrt(hs) + M[a:b, :b]    Y[a:b] = Pd_ab @ v[:b]
          Backward goes through the blocks from the last, which sees every key and so
          sets dk and dv; each earlier block adds its share into their first b rows:
          dv[:b] += Pd_ab^T @ dY[a:b]    dk[:b] += dS_ab^T @ q[a:b]    dq[a:b] = dS_ab @ k[:b]
          The same numbers as above, without the parts of S that are all -inf. With
          128-query blocks, T = 256 computes and keeps 75% of the T x T weights, T = 1024
          56%; T <= 128 is a single block.

decoding with a key/value cache (inference only: no backward):
          A position's k and v depend only on it and on earlier positions, so they
          never change once computed. With `kv_cache` holding them for the first
          P positions, x holds only the T new positions P..P+T-1:
          K, V = cached k, v followed by the new k, v         (B, n_head, P + T, hs)
          S    = q @ K^T / sqrt(hs) + M                        (B, n_head, T, P + T)
                 M[t, u] = -inf for u > P + t: the query at position P + t sees
                 keys 0..P + t, the same keys as in the full forward
          and the rest as above. Each new token then costs attention over P + 1
          keys and the matrix products of one row, not a pass over all P + 1 positions.

On a GPU the scaling and the mask are one fused kernel (backend.fuse), as are
the softmax's elementwise steps (layers/softmax.py).
"""

import functools
import math

from minillm.backend import fuse, fusing, get_array_module
from minillm.layers import dropout, linear, softmax

QUERY_BLOCK = 128


def split_heads(a, n_head):
    """(B, T, C) -> (B, n_head, T, C / n_head)"""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=32)
def causal_mask(T, dtype, xp, past=0):
    """(T, past + T) additive mask for T queries that follow `past` earlier positions.

    Query t (at position past + t) sees keys 0..past + t: 0 there, -inf after.
    With past = 0 it is the square mask: 0 on and below the diagonal, -inf above.
    Every layer of every step asks for the same few masks: each is built once and
    shared, so callers only read it.
    """
    return xp.triu(xp.full((T, past + T), -xp.inf, dtype=dtype), k=past + 1)


@fuse
def scale_and_mask_fused(S, scale, mask):
    """S * scale + M (scale = 1 / sqrt(hs)), as one kernel on a GPU."""
    return S * scale + mask


class KVCache:
    """One attention layer's keys and values for the positions decoded so far.

    k, v: (B, n_head, capacity, hs), allocated once; positions 0..length-1 hold
    data. Writing each step's new rows into place costs the size of the new rows;
    concatenating onto the past instead would copy the whole past every step.
    """

    def __init__(self, batch_size, n_head, capacity, head_size, dtype, xp):
        shape = (batch_size, n_head, capacity, head_size)
        self.k = xp.empty(shape, dtype=dtype)
        self.v = xp.empty(shape, dtype=dtype)
        self.length = 0

    def append(self, k, v):
        """Store the new positions' k, v (B, n_head, T, hs); return the keys and values of all positions."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"{end} positions do not fit a key/value cache of {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def clear(self):
        """Forget every position; the buffers are reused."""
        self.length = 0


def forward(x, w_attn, b_attn, w_proj, b_proj, n_head, dropout_p=0.0, rng=None, kv_cache=None,
            query_block=QUERY_BLOCK):
    """`rng` (a backend.RNG) draws the attention-dropout mask; None switches it off.

    With a `kv_cache` (a KVCache), x holds the positions after the cached ones;
    their keys and values are appended to it, and the returned cache is None:
    this path is for inference and keeps nothing for a backward pass.
    `query_block`: queries per causal block (see the module docstring).
    """
    xp = get_array_module(x)
    C = x.shape[-1]
    if C % n_head:
        raise ValueError(f"n_embd {C} is not divisible by n_head {n_head}")
    scale = 1.0 / math.sqrt(C // n_head)

    qkv, qkv_cache = linear.forward(x, w_attn, b_attn)
    q, k, v = (split_heads(a, n_head) for a in xp.split(qkv, 3, axis=-1))
    if kv_cache is not None:
        k, v = kv_cache.append(k, v)
    T, past = x.shape[1], k.shape[2] - x.shape[1]
    # Y = Pd @ v is written with the heads already side by side (y[b, t, h] = Y[b, h, t]): no merge copy.
    y = xp.empty((x.shape[0], T, n_head, C // n_head), dtype=x.dtype)
    Y = y.transpose(0, 2, 1, 3)
    blocks = []
    for a in range(0, T, query_block):
        b = min(a + query_block, T)
        seen = past + b  # the keys of positions 0 .. past + b - 1
        S = q[:, :, a:b] @ k[:, :, :seen].transpose(0, 1, 3, 2)
        # A single query is the newest position of its block and sees every key: nothing to mask.
        mask = causal_mask(b - a, x.dtype, xp, past + a) if b - a > 1 else None
        if mask is not None and fusing(S):
            S = scale_and_mask_fused(S, scale, mask)
        else:
            S *= scale
            if mask is not None:
                S += mask
        P, softmax_cache = softmax.forward(S)
        Pd, dropout_cache = dropout.forward(P, dropout_p, rng)
        xp.matmul(Pd, v[:, :, :seen], out=Y[:, :, a:b])
        blocks.append((a, b, Pd, softmax_cache, dropout_cache))
    out, proj_cache = linear.forward(y.reshape(x.shape), w_proj, b_proj)
    if kv_cache is not None:
        return out, None
    cache = (qkv_cache, q, k, v, blocks, proj_cache, scale)
    return out, cache


def backward(dout, cache, weight_grads=True):
    """Returns (dx, dw_attn, db_attn, dw_proj, db_proj)."""
    qkv_cache, q, k, v, blocks, proj_cache, scale = cache
    xp = get_array_module(dout)
    B, n_head, T, hs = q.shape
    # dq, dk, dv are written straight into their places in concat(dq, dk, dv): no concatenation copy.
    dqkv = xp.empty((B, T, 3, n_head, hs), dtype=dout.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))

    dy, dw_proj, db_proj = linear.backward(dout, proj_cache, weight_grads)
    dY = split_heads(dy, n_head)
    # The blocks in reverse: the last one sees all T keys, so its products set dk and dv;
    # each earlier block then adds its share into their first b rows.
    for a, b, Pd, softmax_cache, dropout_cache in reversed(blocks):
        dPd = dY[:, :, a:b] @ v[:, :, :b].transpose(0, 1, 3, 2)
        dP = dropout.backward(dPd, dropout_cache)
        dS = softmax.backward(dP, softmax_cache)
        dS *= scale
        xp.matmul(dS, k[:, :, :b], out=dq[:, :, a:b])
        if b == T:
            xp.matmul(Pd.transpose(0, 1, 3, 2), dY[:, :, a:b], out=dv)
            xp.matmul(dS.transpose(0, 1, 3, 2), q[:, :, a:b], out=dk)
        else:
            dv[:, :, :b] += Pd.transpose(0, 1, 3, 2) @ dY[:, :, a:b]
            dk[:, :, :b] += dS.transpose(0, 1, 3, 2) @ q[:, :, a:b]
    dx, dw_attn, db_attn = linear.backward(dqkv.reshape(B, T, 3 * n_head * hs), qkv_cache, weight_grads)
    return dx, dw_attn, db_attn, dw_proj, db_proj
