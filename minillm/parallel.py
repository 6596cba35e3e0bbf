"""The loss and gradients of one batch, computed on every CPU core.

NumPy's matrix products already use every core, but its element-wise work
(GELU, softmax, LayerNorm, the optimizer's updates) runs on one. So the batch is
split by rows into shards, one per thread: NumPy releases Python's global lock
inside its loops, so the threads truly run at once, and each uses a single BLAS
thread so that the cores are not oversubscribed.

The loss is a mean over the batch's counted targets (those not IGNORE_INDEX), so
with n_s counted targets in shard s and n in the batch,

    loss  = sum over s of (n_s / n) * loss_s
    grads = sum over s of (n_s / n) * grads_s

which is exactly the whole batch's loss and gradient, whatever the split.

keep_freed_memory() tunes the C allocator for the repeated steps of training.
"""

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy

from minillm import backend
from minillm.layers.cross_entropy import IGNORE_INDEX


def usable_cores():
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def keep_freed_memory():
    """Have the C allocator keep freed memory for reuse instead of handing it back to the kernel.

    Every training step allocates and frees the same large arrays. glibc by default
    maps each array above 128 KiB afresh and unmaps it when freed, so each step's
    arrays start as untouched pages that the kernel must fault in and zero: about
    20,000 page faults per `small` step, a tenth of its time, and a fifth of a `baby`
    step's. Kept in the heap, freed arrays are reused as they are; the peak barely
    moves. Returns False (and changes nothing) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h>
    return bool(
        mallopt(m_mmap_threshold, 1 << 30)          # arrays up to 1 GiB come from the heap, not fresh maps
        and mallopt(m_trim_threshold, -1)           # free memory at the heap's top stays in the heap
        and mallopt(m_top_pad, 1 << 27)             # and heaps grow 128 MiB at a time, not an array at a time
    )


class Workers:
    """A pool of `threads` threads that run NumPy work side by side (one thread: run in place)."""

    def __init__(self, threads):
        self._pool = None
        if threads > 1:
            from threadpoolctl import ThreadpoolController

            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="minillm")
            self._blas = ThreadpoolController()

    def map(self, fn, items):
        """[fn(item) for item in items], the items spread over the threads.

        A single item (a batch of one row is one shard) runs here, with every
        core left to BLAS: its matrix products are then the only parallel work.
        """
        if self._pool is None or len(items) < 2:
            return [fn(item) for item in items]
        float_errors = numpy.geterr()  # NumPy's error handling is per thread: pass the caller's on

        def run(item):
            with numpy.errstate(**float_errors):
                return fn(item)

        with self._blas.limit(limits=1, user_api="blas"):
            return list(self._pool.map(run, items))

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


def loss_and_gradients(model, idx, targets, rngs, workers):
    """(mean loss, gradients) of the batch idx, targets (host arrays, (B, T)), split into len(rngs) shards.

    Shard s draws its dropout masks from rngs[s]; the same rngs give the same
    result however the threads are scheduled, since the shards are combined in order.
    """
    rows = numpy.array_split(numpy.arange(len(idx)), min(len(rngs), len(idx)))
    counts = [int((targets[r] != IGNORE_INDEX).sum()) for r in rows]
    total = sum(counts)

    def shard(s):
        _, loss, cache = model.forward_with_cache(idx[rows[s]], targets[rows[s]], rngs[s])
        grads = model.backward_from_cache(cache)
        if len(rows) > 1:  # each shard weighs its own share, on its own thread: combining is then a sum
            weight = counts[s] / max(total, 1)
            loss = weight * loss
            for g in grads.values():
                g *= weight
        return loss, grads

    results = workers.map(shard, range(len(rows)))
    loss, grads = results[0]
    for shard_loss, shard_grads in results[1:]:
        loss = loss + shard_loss
        for name, g in shard_grads.items():
            grads[name] += g
    return loss, grads


def mean_loss(model, batches, workers):
    """Mean loss over (idx, targets) batches, a Python float, the batches spread over the threads."""
    losses = workers.map(lambda batch: model.forward_with_cache(*batch)[1], batches)
    return backend.to_float(sum(losses)) / len(batches)
