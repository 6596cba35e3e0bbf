"""AdamW, gradient clipping by global norm, and the learning-rate schedule.

AdamW (decoupled weight decay), for each parameter p with gradient g at step t:
    m = beta1 m + (1 - beta1) g                 running mean of g
    v = beta2 v + (1 - beta2) g^2               running mean of g^2
    p = p - lr * weight_decay * p               decay, kept out of the adaptive step
    p = p - lr * m_hat / (sqrt(v_hat) + eps)    m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)

Which parameters decay: the matrices and embedding tables (ndim >= 2). Biases and
LayerNorm gains (ndim 1) do not: shrinking a gain towards 0 is not a simpler
model, only a different scale, so decaying it would fight the normalisation.

On a GPU each parameter's whole update runs as one fused kernel (backend.fuse)
instead of a dozen passes over p, g, m and v.
"""

import math

from minillm.backend import fuse, fusing, get_array_module


def decays(param):
    """True for the parameters that weight decay applies to (see the module docstring)."""
    return param.ndim >= 2


class AdamW:
    """Updates the arrays of `params` in place; keeps moments for every name in `params`."""

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
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
        b1, b2 = self.beta1, self.beta2
        # Fold the bias corrections into scalars (Python floats keep float32 arrays float32).
        step_size = lr / (1.0 - b1**self.t)
        v_correction = 1.0 / math.sqrt(1.0 - b2**self.t)
        xp = get_array_module(*grads.values())
        for name, g in grads.items():
            p, m, v = self.params[name], self.m[name], self.v[name]
            decay = 1.0 - lr * self.weight_decay if decays(p) else 1.0
            if fusing(p):
                adamw_update_fused(p, g, m, v, b1, 1.0 - b1, b2, 1.0 - b2, decay, step_size, v_correction, self.eps)
                continue
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if decay != 1.0:
                p *= decay
            denom = xp.sqrt(v)
            denom *= v_correction
            denom += self.eps
            p -= step_size * (m / denom)

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


@fuse
def adamw_update_fused(p, g, m, v, b1, one_minus_b1, b2, one_minus_b2, decay, step_size, v_correction, eps):
    """AdamW.step() for one parameter, in place, as one kernel on a GPU (the scalars come ready-made)."""
    m *= b1
    m += one_minus_b1 * g
    v *= b2
    v += one_minus_b2 * (g * g)
    p *= decay
    p -= step_size * (m / (get_array_module(v).sqrt(v) * v_correction + eps))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm.

    norm = sqrt(sum over every gradient array of sum(g^2)); when norm > max_norm
    every g becomes g * max_norm / (norm + 1e-6) (the direction is kept; the 1e-6
    guards a zero norm, and also trims norms within 1e-6 of the limit). Returns the norm
    before clipping as a 0-d array on the gradients' device: reading it as a
    Python float is the caller's choice (it waits for the device).
    """
    xp = get_array_module(*grads.values())
    norm = xp.sqrt(sum((g * g).sum() for g in grads.values()))
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
