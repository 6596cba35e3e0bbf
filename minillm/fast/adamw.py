"""AdamW's update, tuned: the same step as optim.adamw_update (the reference, whose module
docstring has the equations), for one parameter at a time.

What it changes:
- On the CPU it runs in place: m, v and p are updated by in-place operations and the
  bias corrections are folded into two scalars, step_size = lr / (1 - beta1^t) and
  1 / sqrt(1 - beta2^t), so no m_hat or v_hat arrays are formed.
- On the CPU a large parameter is updated a chunk at a time (CHUNK elements): the dozen passes
  of the update then find the chunk of p, g, m, v and their temporaries in the processor's cache,
  where a whole large array would be streamed from memory by every pass. Each element gets the
  very operations it got before, so the numbers are the same to the bit; the time saved is in
  BENCHMARKS.md ("The fast layers one at a time").
- On a GPU the whole update of one parameter is one fused kernel (backend.fuse)
  instead of a dozen passes over p, g, m and v.
The numbers are the reference's up to rounding (the same algebra in another order).
"""

import math

from minillm.backend import device_of, fuse, fusing, get_array_module

CHUNK = 1 << 15  # 128 KiB of float32 per array: a chunk's four arrays and their temporaries fit in L2


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
    arrays = (p, g, m, v)
    if p.size <= CHUNK or device_of(p) != "cpu" or not all(x.flags.c_contiguous for x in arrays):
        update_in_place(p, g, m, v, beta1, beta2, eps, decay, step_size, v_correction)
        return
    p, g, m, v = (x.reshape(-1) for x in arrays)  # views: contiguous arrays reshape without a copy
    for start in range(0, p.size, CHUNK):
        chunk = slice(start, start + CHUNK)
        update_in_place(p[chunk], g[chunk], m[chunk], v[chunk], beta1, beta2, eps, decay, step_size, v_correction)


def update_in_place(p, g, m, v, beta1, beta2, eps, decay, step_size, v_correction):
    """The update of adamw_update on the CPU (or on a GPU with fused kernels off), the scalars ready-made."""
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
