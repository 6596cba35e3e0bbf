"""How many threads the matrix products of sampling use: as many as there are idle cores.

A decoding step multiplies one row per sample by every weight matrix of the model.
With several BLAS threads each product is cut into parts, one per thread, and
waits for the last part. On a quiet machine that pays for large models: GPT-2
small decodes about 40 tokens/s on 2 threads against 23 on one, the weights
streaming from memory through two cores instead of one. But when another program
keeps a core busy, a BLAS thread is often off the CPU when its part is due, and
each of the ~50 products of a token waits for the scheduler to bring it back (and
between products, OpenBLAS's idle threads spin, taking CPU from the one that has
work). Measured on 2 cores beside one busy process: `baby` ran 80 tokens/s on 2
threads against 300 on one, GPT-2 small 5 to 13 against 23; the time went inside
the products (their calls took 12.1 of the 14.3 s of a `baby` run).

So while sampling on the CPU, the BLAS uses one thread per core that other
programs leave idle. CoreWatch reads how busy the machine's cores have been
(Linux's /proc/stat, less this process's own CPU time) a few times a second,
starting from the count the last sampling ended on (one thread, the count that
is never much slower, before any); elsewhere the BLAS keeps its own thread count.
"""

import contextlib
import os
import time

LOOK_EVERY = 0.2  # seconds between readings of the cores' load
clock = time.monotonic
LAST_CHOICE = {"threads": 1}  # the count the last sampling of this process ended on; one before any
# A core counts as taken when other programs keep it busy this share of the time: a quiet machine
# reads up to half a core busy (10 ms clock ticks, the hypervisor's steal), a busy process a whole one.
TAKEN = 0.75


class CoreWatch:
    """Sets the BLAS thread count, at most `most`, to the cores other programs leave idle.

    set_threads(n) sets the count. Call update() between steps: it reads the load at
    most every LOOK_EVERY seconds. Until the first reading, `start` threads.
    """

    def __init__(self, most, set_threads, cores=None, start=1):
        self.most, self.set_threads = most, set_threads
        self.cores = cores or os.cpu_count() or 1
        self.threads = min(start, most)
        set_threads(self.threads)
        self.last = (clock(), *busy_seconds())

    def update(self):
        now = clock()
        wall = now - self.last[0]
        if wall < LOOK_EVERY:
            return
        busy, own = busy_seconds()
        others_busy = ((busy - self.last[1]) - (own - self.last[2])) / wall  # in cores
        self.last = (now, busy, own)
        taken = int(others_busy + 1 - TAKEN)  # the cores other programs keep busy TAKEN of the time or more
        threads = max(1, min(self.most, self.cores - taken))
        if threads != self.threads:
            self.set_threads(threads)
            self.threads = threads


def busy_seconds():
    """(CPU seconds all cores were busy, CPU seconds of this process).

    Busy is everything but idle and waiting for I/O; it counts time the hypervisor
    gave to other machines ("steal"), which is lost to us too.
    """
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    busy_ticks = user + nice + system + irq + softirq + steal
    own = os.times()
    return busy_ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system


class Unwatched:
    """Where there is nothing to watch: the thread count stays as it is."""

    def update(self):
        pass


@contextlib.contextmanager
def watch_for(device):
    """A CoreWatch for sampling on this device, the BLAS thread count restored afterwards.

    Nothing to do on a GPU, where no BLAS thread runs, where the CPU BLAS already
    runs on one thread (one core, or OMP_NUM_THREADS=1), or without /proc/stat.
    """
    if device != "cpu" or not os.path.exists("/proc/stat"):
        yield Unwatched()
        return
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    most = max((lib.num_threads for lib in blas.lib_controllers), default=1)
    if most == 1:
        yield Unwatched()
        return
    with blas.limit(limits=most):  # restores every library's own count at the end
        # Each sampling starts where the last one in this process ended: the load changes slowly.
        watch = CoreWatch(most, lambda n: blas.limit(limits=n), start=LAST_CHOICE["threads"])
        try:
            yield watch
        finally:
            LAST_CHOICE["threads"] = watch.threads
