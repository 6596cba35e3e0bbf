"""Sampling text from a model, one token at a time.

For each new token, from the logits z of the last position:
    z = (z - max z) / temperature      temperature 0: take argmax z instead (greedy)
    top_k: keep the k largest z        (-inf for the rest)
    top_p: keep the smallest set of most likely tokens whose probability reaches p
    next  = a draw from softmax(z)     as argmax(z + g), g ~ Gumbel(0, 1) per token

A batch's rows draw their g from generators of their own, seeded seed, seed + 1, ...: row i
samples what a batch of one with seed + i samples (RowGenerators), up to rounding. A batch's
matrix products run BLAS's matrix-matrix kernel and a single row's its matrix-vector kernel; they
add in different orders, so the logits differ in their last bits, and a token can differ only
where two candidates are within that rounding of each other.

With the KV cache (the default) the prompt is run through the model once (the
"prefill"), and every later step feeds only the token just drawn: each layer
keeps the keys and values of the past positions (see model.decode). Without it,
every step runs the full forward pass over the whole context again.
"""

import math
import os

from minillm import backend, blas_threads, files
from minillm.layers import embedding, softmax
from minillm.tokenizers.char import UnknownCharactersError


def option_problem(temperature, top_k, top_p):
    """(option name, what is wrong) for the first sampling option out of range, or None."""
    if not 0 <= temperature < math.inf:  # written so that NaN fails too
        return "temperature", f"must be 0 or more (and finite), got {temperature}"
    if top_k is not None and top_k < 1:
        return "top_k", f"must be at least 1, got {top_k}"
    if top_p is not None and not 0 < top_p <= 1:
        return "top_p", f"must be in (0, 1], got {top_p}"
    return None


def keep_top_k(logits, k):
    """logits (B, V) with all but the k largest of each row set to -inf.

    Exactly k survive, even when several logits tie at the k-th largest value:
    of the tied ones, those with the lowest token ids are kept, as many as fit.
    """
    xp = backend.get_array_module(logits)
    V = logits.shape[-1]
    if k >= V:
        return logits
    kth_largest = xp.partition(logits, V - k, axis=-1)[:, V - k, None]
    above = logits > kth_largest
    tied = logits == kth_largest
    room = k - above.sum(axis=-1, keepdims=True)  # places left for the tied ones
    keep = above | (tied & (tied.cumsum(axis=-1) <= room))
    return xp.where(keep, logits, -math.inf)


def keep_top_p(logits, p):
    """logits (B, V) with -inf outside the smallest set of most likely tokens whose probability reaches p.

    Tokens are ranked by probability (ties: lower token id first) and kept while
    the probability of the tokens ranked above them is still below p, so the
    most likely token always stays.
    """
    xp = backend.get_array_module(logits)
    probs, _ = softmax.forward(logits)
    order = xp.argsort(-probs, axis=-1, kind="stable")
    ranked = xp.take_along_axis(probs, order, axis=-1)
    keep_ranked = ranked.cumsum(axis=-1) - ranked < p
    keep = xp.empty(keep_ranked.shape, dtype=bool)
    keep[xp.arange(keep.shape[0])[:, None], order] = keep_ranked  # back to token order
    return xp.where(keep, logits, -math.inf)


class RowGenerators:
    """A seeded generator per row of a batch, drawing as backend.RNG does: row i from seed first_seed + i.

    A row's draws are then those of a batch of one with its seed, whatever the rows beside it.
    """

    def __init__(self, first_seed, rows, device="cpu"):
        self.rows = [backend.RNG(first_seed + row, device) for row in range(rows)]

    def uniform(self, shape, dtype):
        """Samples of U[0, 1) of shape (rows, ...): row i from generator i."""
        return self.rows[0].xp.stack([rng.uniform(shape[1:], dtype) for rng in self.rows])


def sample_next(logits, temperature, top_k, top_p, rng):
    """Next token ids (B,) from last-position logits (B, V); temperature 0 means greedy.

    rng: a backend.RNG, or RowGenerators to give each row its own stream.
    """
    xp = backend.get_array_module(logits)
    # Below the dtype's smallest normal number, dividing by the temperature would give 0 / 0 for the
    # largest logit: such a temperature is greedy sampling in all but name.
    limits = xp.finfo(logits.dtype)
    if temperature < float(limits.tiny):
        return logits.argmax(axis=-1)
    # Shifting the largest logit to 0 first: a tiny temperature then sends the others
    # toward -inf (greedy in the limit) instead of overflowing the largest to +inf.
    # A temperature beyond the dtype's range would overflow in the cast: the limit, a uniform draw, is the same.
    logits = (logits - logits.max(axis=-1, keepdims=True)) / min(float(temperature), float(limits.max))
    if top_k is not None:
        logits = keep_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = keep_top_p(logits, top_p)
    # Gumbel-max: argmax(z + g) with independent g = -log(-log(u)), u ~ U(0, 1), is a
    # draw from softmax(z), and tokens at -inf never win. u = 0 is lifted to the
    # smallest positive float so that log stays finite (a change of probability 2^-24 at most).
    u = xp.maximum(rng.uniform(logits.shape, logits.dtype), xp.finfo(logits.dtype).tiny)
    return (logits - xp.log(-xp.log(u))).argmax(axis=-1)


def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=0, use_cache=True):
    """Yield the next token ids, an integer array (B,) on the model's device, max_new_tokens times.

    idx: integer prompt (B, T) with T >= 1, on the host or the device; the model sees its
    last block_size tokens. Stopping the iteration early ends the generation. The same
    seed gives the same tokens, and row i those of a batch of one with seed + i (up to rounding: see
    the module docstring); use_cache=False runs the full forward pass every step.
    With the cache, the loop reads nothing back from a GPU: the tokens stay on the
    device until the caller copies them.
    """
    problem = option_problem(temperature, top_k, top_p)
    if problem:
        raise ValueError(" ".join(problem))
    xp, block_size = model.xp, model.config.block_size
    window = backend.get_array_module(idx).asarray(idx)[..., -block_size:]
    embedding.check_token_ids(window, model.config.vocab_size, block_size)  # on the host, when the prompt is there
    if window.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    window = xp.asarray(window).astype(xp.int64)
    rng = RowGenerators(seed, window.shape[0], model.device)
    kv_cache = model.new_kv_cache(window.shape[0]) if use_cache else None
    was_training = model.training
    model.eval()
    with blas_threads.watch_for(model.device) as cores:
        try:
            logits = last_logits(model, window, kv_cache)
            for step in range(max_new_tokens):
                next_ids = sample_next(logits, temperature, top_k, top_p, rng)
                yield next_ids
                if step + 1 == max_new_tokens:
                    break
                slides = window.shape[1] == block_size  # the new token pushes the oldest one out
                window = xp.concatenate([window[:, 1:] if slides else window, next_ids[:, None]], axis=1)
                cores.update()
                logits = next_logits(model, window, next_ids, kv_cache, slides)
        finally:
            model.train(was_training)


def next_logits(model, window, next_ids, kv_cache, slides):
    """Logits (B, V) after next_ids (B,) joined the window (B, T): by the cache when there is one."""
    if kv_cache is None:
        return last_logits(model, window, None)
    if not slides:
        return model.decode(next_ids[:, None], kv_cache)
    # The window slid by one token, so every token now sits at a new position.
    # Position embeddings are added at the input and flow into every key and
    # value, so the whole cache is stale: rebuild it by a prefill of the new
    # window. That costs a forward pass over block_size tokens (the same as a
    # step without the cache, less the LM head for all but the last position),
    # and once the context is full every step pays it. Cropping to a shorter
    # window would rebuild less often, but the model would then see less
    # context than it can, and the samples would differ from the full forward's.
    for layer_cache in kv_cache:
        layer_cache.clear()
    return model.decode(window, kv_cache)


def last_logits(model, window, kv_cache):
    """Logits (B, V) of the window's last position: a prefill into kv_cache, or a full forward without one."""
    if kv_cache is not None:
        return model.decode(window, kv_cache)
    logits, _ = model(window)
    return logits[:, -1, :]


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=0, use_cache=True):
    """idx (B, T) integer prompt -> (B, T + max_new_tokens) on the model's device; options as stream()."""
    xp = model.xp
    idx = xp.asarray(idx)
    steps = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, use_cache))
    if not steps:
        return idx
    return xp.concatenate([idx.astype(xp.int64), xp.stack(steps, axis=1)], axis=1)


def argument_text(text, where, error):
    """A command-line argument's text, its bytes read as UTF-8 whatever the locale.

    Python decodes the arguments with the locale's encoding, and a byte that does not decode becomes a
    lone surrogate, which no tokenizer can encode: under an ASCII locale (LC_ALL=C) every byte of "ï"
    in "naïve" does. Such an argument is decoded again from its bytes, as UTF-8; `error` where they
    are not UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return files.decode_utf8(os.fsencode(text), where, error)
    return text


def encode_prompt(tokenizer, text):
    """Token ids of the prompt. An empty one starts from the end-of-text token (as GPT-2 does),
    or else a newline token, or token 0 without one."""
    if text:
        return tokenizer.encode(text)
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n")
    except UnknownCharactersError:
        return [0]
