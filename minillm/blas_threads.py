"""How many threads the matrix products of sampling use: as many as there are idle cores.

A decoding step multiplies one row per sample by every weight matrix of the model.
With several BLAS threads each product is cut into parts, one per thread, and
waits for the last part. On a quiet machine that pays for large models: the weights
stream from memory through several cores instead of one. But when another program
keeps a core busy, a BLAS thread is often off the CPU when its part is due, and
each of the ~50 products of a token waits for the scheduler to bring it back (and
between products, OpenBLAS's idle threads spin, taking CPU from the one that has
work). BENCHMARKS.md, "Sampling", has the figures (`python -m minillm.bench.sampling`,
quiet and beside a busy process).

So while sampling on the CPU, the BLAS uses one thread per core that other
programs leave idle. CoreWatch reads how long the machine's cores have been idle
(Linux's /proc/stat) and this process's own CPU time every LOOK_EVERY seconds;
what is neither is other programs' work. Idle time, which the kernel times as
cores enter and leave idle, holds over short windows where busy time, sampled at
the clock's 10 ms ticks, does not. A core counts as taken when other programs use
TAKEN of it. The threshold is low on purpose: while our own threads compete for
a core with another program, the scheduler gives that program only its fair
share of it, well under a whole core, and that share must still read as taken.

One watch serves every sampling of the process: each starts on the count the last
one ended on, and at once on a new count when the load seen since then (LOOK_EVERY
or more of it) says so. The first sampling judges the load since this module was
imported. Elsewhere the BLAS keeps its own thread count.
"""

import contextlib
import os
import time

from minillm import system

LOOK_EVERY = 0.05  # seconds between readings of the cores' load
TAKEN = 0.25  # the share of a core that other programs must keep busy for it to count as taken
clock = time.monotonic


def idle_seconds():
    """(CPU seconds all cores were idle or waiting for I/O, CPU seconds of this process)."""
    return system.cores_idle_seconds(), time.process_time()


class CoreWatch:
    """How many cores other programs leave idle (at least 1: ours), read at most every LOOK_EVERY seconds.

    Until the first reading, 1: the count that is never much slower.
    """

    def __init__(self, cores=None):
        self.cores = cores or os.cpu_count() or 1
        self.idle_cores = 1
        self.last = (clock(), *idle_seconds())

    def update(self):
        """Reads the load if LOOK_EVERY or more has passed since the last reading; returns idle_cores."""
        now = clock()
        wall = now - self.last[0]
        if wall >= LOOK_EVERY:
            idle, own = idle_seconds()
            others_busy = self.cores - ((idle - self.last[1]) + (own - self.last[2])) / wall  # in cores
            self.last = (now, idle, own)
            taken = int(others_busy + 1 - TAKEN)  # the cores other programs keep busy TAKEN of the time or more
            self.idle_cores = max(1, self.cores - taken)
        return self.idle_cores


class Threads:
    """Keeps the BLAS thread count, at most `most`, at the idle cores the watch sees: call update() between steps.

    set_threads(n) sets the count.
    """

    def __init__(self, watch, most, set_threads):
        self.watch, self.most, self.set_threads = watch, most, set_threads
        self.threads = None
        self.update()

    def update(self):
        threads = min(self.most, self.watch.update())
        if threads != self.threads:
            self.set_threads(threads)
            self.threads = threads


class Unwatched:
    """Where there is nothing to watch: the thread count stays as it is."""

    def update(self):
        pass


WATCH = CoreWatch() if system.cores_idle_seconds() is not None else None


@contextlib.contextmanager
def watch_for(device):
    """Threads for sampling on this device, the BLAS thread count restored afterwards.

    Nothing to do on a GPU, where no BLAS thread runs, where the CPU BLAS already
    runs on one thread (one core, or OMP_NUM_THREADS=1), or without /proc/stat.
    """
    if device != "cpu" or WATCH is None:
        yield Unwatched()
        return
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    most = max((lib.num_threads for lib in blas.lib_controllers), default=1)
    if most == 1:
        yield Unwatched()
        return
    with blas.limit(limits=most):  # restores every library's own count at the end
        yield Threads(WATCH, most, lambda n: blas.limit(limits=n))
