"""GELU (GPT-2's tanh approximation), tuned: the numbers of minillm/layers/gelu.py, which has the equations.

What it does differently: both passes work in place on one or two buffers (t = x * x,
then t *= ..., tanh(t, out=t)), where the reference makes a fresh array for every
operation. On large arrays each fresh temporary costs as much as the arithmetic, so
reusing memory is where the time goes. On a GPU, forward and backward each run as one
fused kernel (backend.fuse): the same equations, written as plain expressions.

What it buys in a whole training step: the `without: gelu` row of `python -m minillm.bench.readings`
(BENCHMARKS.md, "Two readings"); the layer alone: BENCHMARKS.md, "The fast layers one at a time"."""

from minillm.backend import fuse, fusing, get_array_module
from minillm.layers.gelu import A, K  # Python floats, so float32 arrays stay float32


def forward(x):
    if fusing(x):
        out, t = forward_fused(x)
        return out, (x, t)
    xp = get_array_module(x)
    t = x * x
    t *= A * K
    t += K
    t *= x                      # u = K (x + A x^3), built as K (1 + A x^2) x
    xp.tanh(t, out=t)           # t = tanh(u)
    out = t + 1.0
    out *= x
    out *= 0.5                  # out = 0.5 x (1 + t)
    return out, (x, t)


def backward(dout, cache):
    """Returns dx."""
    x, t = cache
    if fusing(dout):
        return backward_fused(dout, x, t)
    xp = get_array_module(dout)
    local = x * x
    local *= 3.0 * A * K
    local += K                  # du/dx = K (1 + 3 A x^2)
    local *= x
    local *= 0.5                # 0.5 x du/dx
    sech2 = t * t
    xp.subtract(1.0, sech2, out=sech2)
    local *= sech2              # 0.5 x (1 - t^2) du/dx
    del sech2                   # freed before the next temporary: one buffer less at the peak
    local += 0.5
    local += 0.5 * t            # + 0.5 (1 + t)  = dout/dx
    local *= dout
    return local


@fuse
def forward_fused(x):
    """(out, t) of forward(), as one kernel on a GPU."""
    t = get_array_module(x).tanh(K * (x + A * x * x * x))
    return 0.5 * x * (1.0 + t), t


@fuse
def backward_fused(dout, x, t):
    """dx of backward(), as one kernel on a GPU."""
    du_dx = K * (1.0 + 3.0 * A * x * x)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
