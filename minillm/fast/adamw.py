"""AdamW's update, tuned: the same step as optim.adamw_update (the reference, whose module
docstring has the equations), for one parameter at a time.

What it changes:
- On the CPU it runs in place: m, v and p are updated by in-place operations and the
  bias corrections are folded into two scalars, step_size = lr / (1 - beta1^t) and
  1 / sqrt(1 - beta2^t), so no m_hat or v_hat arrays are formed.
- On a GPU the whole update of one parameter is one fused kernel (backend.fuse)
  instead of a dozen passes over p, g, m and v.
The numbers are the reference's up to rounding (the same algebra in another order).
"""

import math

from minillm.backend import fuse, fusing, get_array_module


def adamw_update(p, g, m, v, lr, t, beta1, beta2, eps, weight_decay):
    """Step t of AdamW for one parameter p with gradient g: updates p, m and v in place."""
    # Python floats keep float32 arrays float32.
    step_size = lr / (1.0 - beta1**t)
    v_correction = 1.0 / math.sqrt(1.0 - beta2**t)
    decay = 1.0 - lr * weight_decay
    if fusing(p):
        # cupy.fuse would compute 1 - beta between two scalar arguments in float16: pass them ready-made.
        adamw_update_fused(p, g, m, v, beta1, 1.0 - beta1, beta2, 1.0 - beta2, decay, step_size, v_correction, eps)
        return
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    if decay != 1.0:
        p *= decay
    denom = get_array_module(v).sqrt(v)
    denom *= v_correction
    denom += eps
    p -= step_size * (m / denom)


@fuse
def adamw_update_fused(p, g, m, v, b1, one_minus_b1, b2, one_minus_b2, decay, step_size, v_correction, eps):
    """adamw_update() as one kernel on a GPU, in place (the scalars come ready-made)."""
    m *= b1
    m += one_minus_b1 * g
    v *= b2
    v += one_minus_b2 * (g * g)
    p *= decay
    p -= step_size * (m / (get_array_module(v).sqrt(v) * v_correction + eps))
