"""GELU, the tanh approximation used by GPT-2.

Shapes:   x: any   out: same as x

forward:  u   = k * (x + a x^3)          with k = sqrt(2/pi), a = 0.044715
          t   = tanh(u)
          out = 0.5 x (1 + t)

backward: du/dx   = k * (1 + 3 a x^2)
          dt/du   = 1 - t^2              (tanh' = 1 - tanh^2)
          dout/dx = 0.5 (1 + t) + 0.5 x dt/du du/dx      (product rule on 0.5 x (1 + t))
          dx      = dout * dout/dx       (elementwise: each out depends on its own x only)

The forward keeps t for the backward pass, which would otherwise compute the tanh again.
"""

import math

from minillm.backend import get_array_module

# Python floats, not NumPy scalars, so float32 arrays stay float32.
K = math.sqrt(2.0 / math.pi)
A = 0.044715


def forward(x):
    xp = get_array_module(x)
    u = K * (x + A * x * x * x)
    t = xp.tanh(u)
    out = 0.5 * x * (1.0 + t)
    return out, (x, t)


def backward(dout, cache):
    """Returns dx."""
    x, t = cache
    du_dx = K * (1.0 + 3.0 * A * x ** 2)                        # u = k (x + a x^3)
    dt_du = 1.0 - t ** 2                                        # t = tanh(u)
    dx = dout * (0.5 * (1.0 + t) + 0.5 * x * dt_du * du_dx)     # out = 0.5 x (1 + t)
    return dx
