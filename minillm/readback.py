"""What the training loop reads back from the device, and when.

A GPU runs the work the host queues for it asynchronously. Reading any value
back (a loss as a float, a clock after the work) waits until everything queued
so far is done, and the GPU then idles while the host queues the next step. So
on a GPU the loop reads at its sync points only: the log lines, and before each
evaluation and save. Between them, steps are queued back to back:

    StepClock         times the steps, synchronising the device before reading the clock
    NonfiniteWatch    keeps, on the device, the first step whose loss or gradient
                      norm was not finite, and raises at the next sync point

On the CPU reading costs nothing (checks_each_step): every step's loss and
gradients are checked as the step ends, before its update, so the error can
also name the first gradient that went bad.
"""

import math
import time

from minillm import backend


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


def checks_each_step(device):
    """True where reading a step's values back costs nothing: the CPU."""
    return device == "cpu"


def describe_nonfinite(loss, grads):
    """Where the numbers first went bad (loss a Python float): the loss itself, the first non-finite
    gradient of `grads`, or else the gradient norm.

    The backward pass computes the gradients from the output back to the input,
    the reverse of the order of model.params, so that is the order searched.
    """
    if not math.isfinite(loss):
        return f"the loss is {loss} (the forward pass overflowed)"
    for name in reversed(list(grads)):
        if not bool(backend.get_array_module(grads[name]).isfinite(grads[name]).all()):
            return f"the loss is finite, but the gradient of {name} is the first to be non-finite"
    return "the gradient norm overflowed"


def nonfinite_error(step, description, out_dir):
    return TrainingError(
        f"step {step}: {description}; nothing from this step on was saved, "
        f"the last good checkpoints in {out_dir} are kept. Try a lower --lr or a --grad-clip"
    )


class NonfiniteWatch:
    """Stops training at a step whose loss or gradient norm was not finite, before its update is saved.

    step_done() runs after each step's gradients, before its update. On the CPU it
    raises at once, naming the first bad gradient. On a GPU it records the first bad
    step on the device, without a read, and check() raises at the next sync point.
    """

    def __init__(self, device, dtype, out_dir):
        xp = backend.array_module(device)
        self.each_step = checks_each_step(device)
        self.out_dir = out_dir
        self.first_bad_step = xp.asarray(-1)
        self.loss_then = xp.zeros((), dtype=dtype)

    def step_done(self, step, loss, grad_norm, grads):
        """loss, grad_norm: 0-d device arrays; grads: the step's gradients."""
        if self.each_step:
            loss_value = backend.to_float(loss)
            if not (math.isfinite(loss_value) and math.isfinite(backend.to_float(grad_norm))):
                raise nonfinite_error(step, describe_nonfinite(loss_value, grads), self.out_dir)
            return
        xp = backend.get_array_module(loss)
        # inf - inf and nan both give nan: the sum is finite only when both are.
        first = (self.first_bad_step < 0) & ~xp.isfinite(loss + grad_norm)
        self.first_bad_step = xp.where(first, step, self.first_bad_step)
        self.loss_then = xp.where(first, loss, self.loss_then)

    def check(self):
        """Raise TrainingError if a recorded step went bad (a read: waits for the device)."""
        step = int(backend.to_host(self.first_bad_step))
        if step >= 0:  # that step's gradients are gone: the description stops at the loss and the norm
            raise nonfinite_error(step, describe_nonfinite(backend.to_float(self.loss_then), {}), self.out_dir)


class StepClock:
    """Time spent in training steps, evaluations and saves left out.

    start() opens a stretch of steps (if none is open), pause() closes it, which
    first waits for the device to finish them, and rates() reads the totals since
    the last rates().
    """

    def __init__(self, device):
        self.device = device
        self.started = None
        self.seconds, self.steps, self.tokens = 0.0, 0, 0

    def start(self):
        if self.started is None:
            self.started = time.perf_counter()

    def count(self, tokens):
        self.steps += 1
        self.tokens += tokens

    def pause(self):
        if self.started is not None:
            backend.synchronize(self.device)
            self.seconds += time.perf_counter() - self.started
            self.started = None

    def rates(self):
        """(ms per step, tokens per second) since the last call; the clock starts afresh."""
        self.pause()
        seconds = max(self.seconds, 1e-9)
        ms_per_step, tokens_per_s = 1000 * seconds / max(self.steps, 1), self.tokens / seconds
        self.seconds, self.steps, self.tokens = 0.0, 0, 0
        return ms_per_step, tokens_per_s
