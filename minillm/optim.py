"""AdamW, gradient clipping by global norm, and the learning-rate schedule.

AdamW (decoupled weight decay), for each parameter p with gradient g at step t:
    m = beta1 m + (1 - beta1) g                 running mean of g
    v = beta2 v + (1 - beta2) g^2               running mean of g^2
    p = p - lr * weight_decay * p               decay, kept out of the adaptive step
    p = p - lr * m_hat / (sqrt(v_hat) + eps)    m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)

Which parameters decay: the matrices and embedding tables (ndim >= 2). Biases and
LayerNorm gains (ndim 1) do not: shrinking a gain towards 0 is not a simpler
model, only a different scale, so decaying it would fight the normalisation.

adamw_update below is these equations as code, the reference; minillm/fast/adamw.py
is the same update tuned (in place, and one fused kernel on a GPU), what AdamW uses
unless built with reference=True or given another update function (a learner's: minillm/exercises).
"""

import math

import minillm.fast.adamw
from minillm.backend import get_array_module


def decays(param):
    """True for the parameters that weight decay applies to (see the module docstring)."""
    return param.ndim >= 2


def adamw_update(p, g, m, v, lr, t, beta1, beta2, eps, weight_decay):
    """Step t of AdamW for one parameter p with gradient g: updates p, m and v in place."""
    xp = get_array_module(p)
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * (g * g)
    m_hat = m / (1.0 - beta1**t)
    v_hat = v / (1.0 - beta2**t)
    p[...] = p - lr * weight_decay * p
    p[...] = p - lr * m_hat / (xp.sqrt(v_hat) + eps)


class AdamW:
    """Updates the arrays of `params` in place; keeps moments for every name in `params`.

    reference=True takes each step with adamw_update above, else with its fast twin; `update`, a
    function with adamw_update's signature, replaces both.
    """

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, reference=False,
                 update=None):
        self.reference, self.update = reference, update
        self.params = params
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.t = 0
        xp = get_array_module(*params.values())
        self.m = {name: xp.zeros_like(p) for name, p in params.items()}
        self.v = {name: xp.zeros_like(p) for name, p in params.items()}

    def step(self, grads, lr=None):
        """One update from `grads` (name -> array); `lr` overrides the base rate for this step."""
        lr = self.lr if lr is None else lr
        self.t += 1
        # Chosen at each step, not once: minillm.bench.readings swaps the fast update for the reference's.
        update = self.update or (adamw_update if self.reference else minillm.fast.adamw.adamw_update)
        for name, g in grads.items():
            p = self.params[name]
            decay = self.weight_decay if decays(p) else 0.0
            update(p, g, self.m[name], self.v[name], lr, self.t, self.beta1, self.beta2, self.eps, decay)

    def state_dict(self):
        """Arrays and scalars that, with the parameters, resume training exactly."""
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state):
        """Restore moments saved by state_dict(); they must cover exactly this optimizer's parameters."""
        if set(state["m"]) != set(self.params) or set(state["v"]) != set(self.params):
            raise ValueError("the saved optimizer state is for a different set of parameters")
        self.t = int(state["t"])
        for name in self.params:
            xp = get_array_module(self.m[name])
            for mine, saved in ((self.m[name], state["m"][name]), (self.v[name], state["v"][name])):
                if saved is None or saved.shape != mine.shape:
                    raise ValueError(f"the saved optimizer state of {name} is missing or has the wrong shape")
                mine[...] = xp.asarray(saved)


def clip_grad_norm(grads, max_norm, across_shards=None):
    """Scale all gradients in place so their global L2 norm is at most max_norm.

    norm = sqrt(sum over every gradient array of sum(g^2)); when norm > max_norm
    every g becomes g * max_norm / (norm + 1e-6) (the direction is kept; the 1e-6
    guards a zero norm, and also trims norms within 1e-6 of the limit). Returns the norm
    before clipping as a 0-d array on the gradients' device: reading it as a
    Python float is the caller's choice (it waits for the device).
    When `grads` is one rank's part of the gradients (ZeRO-1, minillm/zero.py),
    across_shards(sum of squares) sums the parts' sums over the ranks.
    """
    xp = get_array_module(*grads.values())
    squares = sum((g * g).sum() for g in grads.values())
    norm = xp.sqrt(squares if across_shards is None else across_shards(squares))
    if max_norm:
        scale = xp.minimum(1.0, max_norm / (norm + 1e-6))
        for g in grads.values():
            g *= scale
    return norm


def cosine_lr(step, max_lr, min_lr, warmup_iters, decay_iters):
    """Linear warmup to max_lr over warmup_iters steps, then cosine decay to min_lr at decay_iters.

    warmup:  lr = max_lr * (step + 1) / warmup_iters                  step < warmup_iters
    decay:   lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2   r = progress in [0, 1]
    after:   lr = min_lr                                              step >= decay_iters
    """
    if step < warmup_iters:
        return max_lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
