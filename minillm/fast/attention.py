"""Causal multi-head self-attention, tuned: the numbers of minillm/layers/attention.py, which has the equations.

What it does differently, and what that buys:

causal blocks: the queries are taken query_block at a time. Block [a, b) is S, P and Y
          for rows a..b-1 and needs only the keys 0..b-1, as the later ones are masked out:
          S_ab = q[a:b] @ k[:b]^T / sqrt(hs) + M[a:b, :b]    Y[a:b] = Pd_ab @ v[:b]
          Backward goes through the blocks from the last, which sees every key and so
          sets dk and dv; each earlier block adds its share into their first b rows:
          dv[:b] += Pd_ab^T @ dY[a:b]    dk[:b] += dS_ab^T @ q[a:b]    dq[a:b] = dS_ab @ k[:b]
          The same numbers, without the parts of S that are all -inf. With
          128-query blocks, T = 256 computes and keeps 75% of the T x T weights, T = 1024
          56%; T <= 128 is a single block.
no copies: Y is written through a view straight into the (B, T, C) layout the projection
          reads, and dq, dk, dv straight into their places in concat(dq, dk, dv): no merge
          or concatenation copies. Scores are scaled and masked in place; the masks are
          built once per shape (lru_cache) and shared.
dropout:  when it is on, the uniforms are drawn once for all (B, n_head, T, past + T)
          weights, the very draw of the reference (the masked-out part too: the price of
          the same numbers), and each block keeps its slice [:, :, a:b, :seen] with the
          reference's rule (keep = u >= p, mask = keep / (1 - p)): both readings give the
          same numbers for the same generator.
GPU:      the scaling and the mask are one fused kernel (backend.fuse), as are the
          softmax's elementwise steps (fast/softmax.py).
KVCache:  k and v are allocated once for the whole capacity and each step's new rows are
          written into place, where concatenating onto the past copies the whole past
          every step.
one new position: a decoding step's single query sees every cached key, so it skips
          the loop (one_new_position): no mask, no blocks, and P @ v has the heads in
          y's order already; q, k, v are split from qkv by one reshape (the loop's path
          too). What it buys a decoding step: BENCHMARKS.md, "The fast layers one at a time".

What it buys in a whole training step: the `without: attention` row of `python -m minillm.bench.readings`
(BENCHMARKS.md, "Two readings"); the layer alone: BENCHMARKS.md, "The fast layers one at a time"."""

import functools
import math

from minillm.backend import fuse, fusing, get_array_module
from minillm.fast import linear, softmax
from minillm.layers import dropout

QUERY_BLOCK = 128


def split_heads(a, n_head):
    """(B, T, C) -> (B, n_head, T, C / n_head)"""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=32)
def causal_mask(T, past, dtype, xp):
    """(T, past + T) additive mask for T queries that follow `past` earlier positions.

    Query t (at position past + t) sees keys 0..past + t: 0 there, -inf after.
    Every layer of every step asks for the same few masks: each is built once and
    shared, so callers only read it.
    """
    return xp.triu(xp.full((T, past + T), -xp.inf, dtype=dtype), k=past + 1)


def query_blocks(T, query_block):
    """[(a, b)]: the causal blocks of queries a..b-1, query_block at a time, covering 0..T-1."""
    return [(a, min(a + query_block, T)) for a in range(0, T, query_block)]


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
        self.capacity = capacity
        shape = (batch_size, n_head, capacity, head_size)
        self.k = xp.empty(shape, dtype=dtype)
        self.v = xp.empty(shape, dtype=dtype)
        self.length = 0

    def append(self, k, v):
        """Store the new positions' k, v (B, n_head, T, hs); return the keys and values of all positions."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"{end} positions do not fit a key/value cache of {self.capacity}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def clear(self):
        """Forget every position; the buffers are reused."""
        self.length = 0


def forward(x, w_attn, b_attn, w_proj, b_proj, n_head, dropout_p=0.0, rng=None, kv_cache=None, keep_weights=None,
            query_block=QUERY_BLOCK):
    """`rng` (a backend.RNG) draws the attention-dropout mask; None switches it off.

    With a `kv_cache` (a KVCache), x holds the positions after the cached ones;
    their keys and values are appended to it, and the returned cache is None:
    this path is for inference and keeps nothing for a backward pass.
    `keep_weights`, a list, gets P (B, n_head, T, past + T) appended: the attention
    weights this pass used, each block's rows put in place (zero where a block
    computed nothing, as the mask makes them), for minillm/inspect.py.
    `query_block`: queries per causal block (see the module docstring).
    """
    xp = get_array_module(x)
    B, T, C = x.shape
    if C % n_head:
        raise ValueError(f"n_embd {C} is not divisible by n_head {n_head}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(C // n_head)

    qkv, qkv_cache = linear.forward(x, w_attn, b_attn)
    q, k, v = qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)  # views: split and heads at once
    if kv_cache is not None:
        k, v = kv_cache.append(k, v)
    past = k.shape[2] - T
    # The reference's one draw for all the weights; each block takes its slice.
    u = rng.uniform((B, n_head, T, past + T), x.dtype) if dropout_p > 0.0 and rng is not None else None
    if kv_cache is not None and T == 1 and u is None and keep_weights is None:
        return one_new_position(q, k, v, scale, w_proj, b_proj), None
    # Y = Pd @ v is written with the heads already side by side (y[b, t, h] = Y[b, h, t]): no merge copy.
    y = xp.empty((B, T, n_head, C // n_head), dtype=x.dtype)
    Y = y.transpose(0, 2, 1, 3)
    kept = None if keep_weights is None else xp.zeros((B, n_head, T, past + T), dtype=x.dtype)
    blocks = []
    for a, b in query_blocks(T, query_block):
        seen = past + b  # the keys of positions 0 .. past + b - 1
        S = q[:, :, a:b] @ k[:, :, :seen].transpose(0, 1, 3, 2)
        # A single query is the newest position of its block and sees every key: nothing to mask.
        mask = causal_mask(b - a, past + a, x.dtype, xp) if b - a > 1 else None
        if mask is not None and fusing(S):
            S = scale_and_mask_fused(S, scale, mask)
        else:
            S *= scale
            if mask is not None:
                S += mask
        P, softmax_cache = softmax.forward(S)
        if kept is not None:
            kept[:, :, a:b, :seen] = P
        if u is None:
            Pd, dropout_cache = P, None
        else:  # reference dropout's rule on this block's slice of the draw
            dropout_cache = (u[:, :, a:b, :seen] >= dropout_p).astype(x.dtype)
            dropout_cache /= 1.0 - dropout_p
            Pd = P * dropout_cache
        xp.matmul(Pd, v[:, :, :seen], out=Y[:, :, a:b])
        blocks.append((a, b, Pd, softmax_cache, dropout_cache))
    del u
    if kept is not None:
        keep_weights.append(kept)
    out, proj_cache = linear.forward(y.reshape(x.shape), w_proj, b_proj)
    if kv_cache is not None:
        return out, None
    cache = (qkv_cache, q, k, v, blocks, proj_cache, scale)
    return out, cache


def one_new_position(q, k, v, scale, w_proj, b_proj):
    """forward()'s output (B, 1, C) for a decoding step: one new position after the cached ones.

    The loop's single block without what one query does not need: it sees every
    key, so there is no mask; nothing is kept; and Y (B, n_head, 1, hs) already
    holds the heads in y's order, so a reshape merges them where the loop writes
    through a transposed view.
    """
    B, n_head, _, hs = q.shape
    S = q @ k.transpose(0, 1, 3, 2)
    S *= scale
    P, _ = softmax.forward(S)
    out, _ = linear.forward((P @ v).reshape(B, 1, n_head * hs), w_proj, b_proj)
    return out


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
