"""GELU (GPT-2's tanh approximation), tuned: the numbers of minillm/layers/gelu.py, which has the equations.

What it does differently: both passes work in place on one or two buffers (s = x * x,
then s *= ..., tanh(s, out=s)), where the reference makes a fresh array for every
operation. On large arrays each fresh temporary costs as much as the arithmetic, so
reusing memory is where the time goes. The forward keeps s = 0.5 (1 + t) rather than t:
it is the factor the output is x times, and since t = 2s - 1, the backward's
0.5 (1 - t^2) is 2 s (1 - s), so

    dout/dx = s + s (1 - s) x (2K + 6AK x^2)

takes 9 passes over the array where the reference's formula, in place, took 13. On a GPU,
forward and backward each run as one fused kernel (backend.fuse): the same equations, written
as plain expressions.

What it buys in a whole training step: the `without: gelu` row of `python -m minillm.bench.readings`
(BENCHMARKS.md, "Two readings"); the layer alone: BENCHMARKS.md, "The fast layers one at a time"."""

from minillm.backend import fuse, fusing, get_array_module
from minillm.layers.gelu import A, K  # Python floats, so float32 arrays stay float32


def forward(x):
    if fusing(x):
        out, s = forward_fused(x)
        return out, (x, s)
    xp = get_array_module(x)
    s = x * x
    s *= A * K
    s += K
    s *= x                      # u = K (x + A x^3), built as K (1 + A x^2) x
    xp.tanh(s, out=s)           # t = tanh(u)
    s += 1.0
    s *= 0.5                    # s = 0.5 (1 + t)
    return s * x, (x, s)        # out = 0.5 x (1 + t) = x s


def backward(dout, cache):
    """Returns dx."""
    x, s = cache
    if fusing(dout):
        return backward_fused(dout, x, s)
    local = x * x
    local *= 6.0 * A * K
    local += 2.0 * K
    local *= x                  # 2 x du/dx = x (2K + 6AK x^2)
    spread = 1.0 - s
    spread *= s                 # s (1 - s) = 0.25 (1 - t^2): tanh' from s
    local *= spread             # 0.5 x (1 - t^2) du/dx
    del spread                  # freed before the next temporary: one buffer less at the peak
    local += s                  # + 0.5 (1 + t)  = dout/dx
    local *= dout
    return local


@fuse
def forward_fused(x):
    """(out, s) of forward(), as one kernel on a GPU."""
    s = 0.5 * (1.0 + get_array_module(x).tanh(K * (x + A * x * x * x)))
    return x * s, s


@fuse
def backward_fused(dout, x, s):
    """dx of backward(), as one kernel on a GPU."""
    return dout * (s + s * (1.0 - s) * x * (2.0 * K + 6.0 * A * K * x * x))
