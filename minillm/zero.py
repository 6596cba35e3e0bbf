"""ZeRO stage 1: AdamW's moments sharded across the ranks, so each rank keeps 1/N of them.

The trainable parameters live in one flat buffer, cut into N equal parts (the last one
padded with zeros); rank r owns part r. A step (train_step with --zero 1, its `ranks` a ZeroRanks):

    reduce-scatter   rank r receives part r of the gradients, summed over the ranks
                     (ZeroRanks.sum_gradients)
    norm             the squared gradient norm of each part, summed over the ranks (two numbers,
                     with the loss), so clipping scales by the whole gradient's norm (ZeroRanks.across_shards)
    update           rank r takes the AdamW step of its part only, with its part of m and v
    allgather        every rank receives every updated part: the parameters are whole again

The update of each element is optim.adamw_update's (or its fast twin's, or the one given), the same
arithmetic as the whole-array step, applied to the pieces of the parameters that fall in
the rank's part. Checkpoints hold the whole m and v under each parameter's name: saving
gathers the parts on rank 0, resuming takes the part of the new rank count, so a file does
not depend on how many ranks wrote or read it.
"""

import minillm.fast.adamw
from minillm import backend
from minillm.distributed import FlatLayout
from minillm.optim import adamw_update, decays


class ShardedAdamW:
    """AdamW over `model`'s trainable parameters whose moments are split across `world`'s ranks.

    The model's trainable parameters become views of one flat buffer (so that one allgather
    refreshes them all). Built with the arguments of optim.AdamW, it is used like it:
    step(grads, lr), state_dict(), load_state_dict(state).
    """

    def __init__(self, model, world, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, reference=False,
                 update=None):
        self.world, self.reference, self.update = world, reference, update
        self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        params = model.trainable_params()
        self.layout = FlatLayout(params, parts=world.size)
        self.shapes = {name: p.shape for name, p in params.items()}
        self.decays = {name: decays(p) for name, p in params.items()}
        self.flat_params = self.layout.buffer
        for name, (start, end) in self.layout.spans.items():
            self.flat_params[start:end] = params[name].reshape(-1)
            model.params[name] = self.flat_params[start:end].reshape(params[name].shape)
        self.grad_buffer = self.layout.buffer.copy()
        xp = backend.get_array_module(self.flat_params)
        part = self.layout.part
        self.lo, self.hi = world.rank * part, (world.rank + 1) * part
        self.grad_part = xp.zeros(part, dtype=self.flat_params.dtype)
        self.m, self.v = xp.zeros_like(self.grad_part), xp.zeros_like(self.grad_part)
        # The pieces of each parameter that fall in this rank's part: name -> (start, end) within the part.
        self.pieces = {
            name: (max(start, self.lo) - self.lo, min(end, self.hi) - self.lo)
            for name, (start, end) in self.layout.spans.items() if start < self.hi and end > self.lo
        }

    def sum_gradients(self, loss, grads):
        """(loss summed over the ranks, this rank's part of the summed gradients as name -> 1-D piece)."""
        flat = self.grad_buffer
        for name, (start, end) in self.layout.spans.items():
            flat[start:end] = grads[name].reshape(-1)
        self.world.reduce_scatter(flat, self.grad_part)
        xp = backend.get_array_module(flat)
        loss = self.world.allreduce(xp.asarray(loss, dtype=flat.dtype).reshape(1))[0]
        return loss, {name: self.grad_part[a:b] for name, (a, b) in self.pieces.items()}

    def across_shards(self, squared_norm):
        """The squared norm of the whole gradient from this part's."""
        xp = backend.get_array_module(self.flat_params)
        return self.world.allreduce(xp.asarray(squared_norm, dtype=self.flat_params.dtype).reshape(1))[0]

    def step(self, grads, lr=None):
        """Update this rank's part from its gradient pieces, then gather every rank's part."""
        lr = self.lr if lr is None else lr
        self.t += 1
        update = self.update or (adamw_update if self.reference else minillm.fast.adamw.adamw_update)
        for name, (a, b) in self.pieces.items():
            p = self.flat_params[self.lo + a:self.lo + b]
            decay = self.weight_decay if self.decays[name] else 0.0
            update(p, grads[name], self.m[a:b], self.v[a:b], lr, self.t, self.beta1, self.beta2, self.eps, decay)
        self.world.allgather(self.flat_params)

    def state_dict(self):
        """The whole moments by name on rank 0 (every rank must call this: it gathers); None elsewhere."""
        whole_m, whole_v = (self.world.gather(backend.to_host(part)) for part in (self.m, self.v))
        if not self.world.is_main:
            return None
        unflatten = lambda whole: {
            name: whole[start:end].reshape(self.shapes[name]) for name, (start, end) in self.layout.spans.items()
        }
        return {"t": self.t, "m": unflatten(whole_m), "v": unflatten(whole_v)}

    def load_state_dict(self, state):
        """Take this rank's part of whole moments saved by any rank count (or by optim.AdamW)."""
        if set(state["m"]) != set(self.shapes) or set(state["v"]) != set(self.shapes):
            raise ValueError("the saved optimizer state is for a different set of parameters")
        for saved in (state["m"], state["v"]):
            for name, shape in self.shapes.items():
                if saved[name] is None or saved[name].shape != shape:
                    raise ValueError(f"the saved optimizer state of {name} is missing or has the wrong shape")
        xp = backend.get_array_module(self.m)
        for mine, saved in ((self.m, state["m"]), (self.v, state["v"])):
            for name, (a, b) in self.pieces.items():
                array, start = saved[name], self.layout.spans[name][0]
                mine[a:b] = xp.asarray(array.reshape(-1)[self.lo + a - start:self.lo + b - start])
        self.t = int(state["t"])


class ZeroRanks:
    """The ranks of `world` as train_step sees them when `optimizer` (a ShardedAdamW) keeps a part of each
    gradient: the same draws and weights as the world's, but the gradients reduce-scattered into the
    optimizer's parts, and a squared norm summed over those parts."""

    def __init__(self, world, optimizer):
        self.world, self.optimizer = world, optimizer

    @property
    def stream_keys(self):
        return self.world.stream_keys

    def micro_batch_weights(self, micro_batches):
        return self.world.micro_batch_weights(micro_batches)

    def sum_gradients(self, loss, grads):
        """(loss summed over the ranks, this rank's part of the summed gradients): ShardedAdamW.sum_gradients."""
        return self.optimizer.sum_gradients(loss, grads)

    def across_shards(self, squared_norm):
        """The whole gradient's squared norm from this rank's part's: ShardedAdamW.across_shards."""
        return self.optimizer.across_shards(squared_norm)
