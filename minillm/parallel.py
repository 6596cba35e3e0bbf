"""The loss and gradients of one batch, computed on every CPU core: a wrapper around the model.

NumPy's matrix products already use every core, but its element-wise work
(GELU, softmax, LayerNorm, the optimizer's updates) runs on one. So the batch is
split by rows into shards, one per thread (ShardedGPT): NumPy releases Python's global lock
inside its loops, so the threads truly run at once, and each uses a single BLAS
thread so that the cores are not oversubscribed.

The loss is a mean over the batch's counted targets (those not IGNORE_INDEX), so
with n_s counted targets in shard s and n in the batch,

    loss  = sum over s of (n_s / n) * loss_s
    grads = sum over s of (n_s / n) * grads_s

which is exactly the whole batch's loss and gradient, whatever the split.

Training asks for both passes at once, forward_backward(model, idx, targets): a ShardedGPT
then runs each shard's forward and backward as one task on one thread, so the threads never
wait for one another between the two passes. system.keep_freed_memory() tunes the C allocator for
the repeated steps of training.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy

from minillm.layers.cross_entropy import IGNORE_INDEX

# Training and the benchmarks call these as parallel.*: what they do differs by operating system.

# More threads than this is a typo rather than a machine; each thread holds a replica's caches.
MAX_THREADS = 1024


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


def forward_backward(model, idx, targets):
    """(the batch's mean loss, its gradients): the forward pass, then the backward pass.

    A GPT runs the two in turn; a ShardedGPT runs both for each shard on that shard's thread.
    """
    if isinstance(model, ShardedGPT):
        return model.forward_backward(idx, targets)
    _, loss = model(idx, targets)
    return loss, model.backward()


class ShardedGPT:
    """A GPT whose batch is split by rows across threads, one shard of rows per thread.

    Each thread runs a replica of the model (the same parameters, its own forward cache and
    dropout generator) on its rows. forward_backward(idx, targets) runs each shard's forward
    and then its backward in one task, what training calls; model(idx, targets) and backward()
    are the GPT's own pair, split the same way, with the threads joined between the two passes.
    The shards' gradients are added in shard order, so the result does not depend on how the
    threads are scheduled, nor on which of the two ways computed it. No logits are returned
    (they stay with the shards: training needs only the loss).
    """

    def __init__(self, model, threads):
        self.replicas = [model.replica() for _ in range(threads)]
        self.workers = Workers(threads)
        self._weights = None  # each shard's share of the batch whose forward pass backward() follows

    def train(self, mode=True):
        for replica in self.replicas:
            replica.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def reseed(self, seed):
        """Shard s draws its dropout masks from a generator seeded with (seed, s)."""
        for s, replica in enumerate(self.replicas):
            replica.reseed(int(numpy.random.SeedSequence([seed, s]).generate_state(1)[0]))

    def forward_backward(self, idx, targets):
        """(the batch's mean loss, its gradients) for host arrays idx, targets (B, T), in training mode.

        Each shard's backward runs right after its forward, on the same thread: the threads
        then never wait for one another between the two passes.
        """
        rows, weights = self._shards(idx, targets)
        self._weights = None  # this call uses up the replicas' caches: no backward() may follow it

        def shard(s):
            replica = self.replicas[s]
            _, loss = replica(idx[rows[s]], targets[rows[s]])
            return loss, _weighted(replica.backward(), weights[s], len(rows))

        results = self.workers.map(shard, range(len(rows)))
        return _mean_loss(weights, [loss for loss, _ in results]), _summed([grads for _, grads in results])

    def __call__(self, idx, targets):
        """(None, the batch's mean loss): each shard's forward pass on its own thread.

        In training mode each replica keeps what backward() needs; in eval mode nothing.
        """
        rows, weights = self._shards(idx, targets)
        losses = self.workers.map(lambda s: self.replicas[s](idx[rows[s]], targets[rows[s]])[1], range(len(rows)))
        self._weights = weights if self.replicas[0].training else None
        return None, _mean_loss(weights, losses)

    def backward(self):
        """The gradients of the last model(idx, targets): each shard's backward pass on its own thread."""
        if self._weights is None:
            raise RuntimeError("backward() needs a forward() in training mode (train()) first")
        weights, self._weights = self._weights, None
        return _summed(self.workers.map(
            lambda s: _weighted(self.replicas[s].backward(), weights[s], len(weights)), range(len(weights))
        ))

    def _shards(self, idx, targets):
        """(the rows of each shard, each shard's share n_s / n of the batch's counted targets)."""
        rows = numpy.array_split(numpy.arange(len(idx)), min(len(self.replicas), len(idx)))
        counts = [int((targets[r] != IGNORE_INDEX).sum()) for r in rows]
        return rows, [count / max(sum(counts), 1) for count in counts]

    def close(self):
        self.workers.close()


def _weighted(grads, weight, shards):
    """grads * weight, in place, on the shard's own thread (combining them is then a sum); one shard is the whole."""
    if shards > 1:
        for g in grads.values():
            g *= weight
    return grads


def _mean_loss(weights, losses):
    """The batch's mean loss: sum over shards s of (n_s / n) * loss_s."""
    return sum(weight * loss for weight, loss in zip(weights, losses))


def _summed(shard_grads):
    """The shards' weighted gradients added in shard order, into the first shard's arrays."""
    grads, *others = shard_grads
    for grads_of_shard in others:
        for name, g in grads_of_shard.items():
            grads[name] += g
    return grads
