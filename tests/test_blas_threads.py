"""The BLAS thread count while sampling: one per core that other programs leave idle, restored afterwards."""

import numpy
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from minillm import blas_threads
from minillm.model import GPT, GPTConfig
from minillm.sampling import stream


class Clock:
    """Scripted clock() and idle_seconds(): each tick moves the wall clock, the cores' idle time and our CPU time."""

    def __init__(self, monkeypatch):
        self.wall, self.idle, self.own = 100.0, 50.0, 5.0
        monkeypatch.setattr(blas_threads, "clock", lambda: self.wall)
        monkeypatch.setattr(blas_threads, "idle_seconds", lambda: (self.idle, self.own))

    def tick(self, wall, cores, others, own):
        """`wall` seconds in which other programs kept `others` of the `cores` busy and we `own`."""
        self.wall += wall
        self.idle += wall * (cores - others - own)
        self.own += wall * own


@pytest.mark.parametrize("cores, others, expected", [
    (2, 0.0, 2), (2, 0.2, 2), (2, 0.3, 1), (2, 0.67, 1), (2, 1.0, 1), (2, 2.0, 1), (8, 3.0, 5), (8, 2.3, 5),
    (8, 2.2, 6), (8, 0.0, 8),
])
def test_threads_follow_the_cores_other_programs_leave_idle(monkeypatch, cores, others, expected):
    clock, chosen = Clock(monkeypatch), []
    watch = blas_threads.CoreWatch(cores=cores)
    threads = blas_threads.Threads(watch, cores, chosen.append)
    assert chosen == [1]  # one thread until the load has been seen
    clock.tick(wall=0.5, cores=cores, others=others, own=1.0)
    threads.update()
    assert threads.threads == expected and chosen[-1] == expected


def test_our_own_threads_do_not_count_as_other_programs(monkeypatch):
    clock = Clock(monkeypatch)
    watch = blas_threads.CoreWatch(cores=2)
    clock.tick(wall=0.5, cores=2, others=0.0, own=2.0)  # our two threads fill both cores
    assert watch.update() == 2
    clock.tick(wall=0.5, cores=2, others=0.67, own=1.33)  # a busy program's fair share beside them
    assert watch.update() == 1


def test_the_load_is_read_at_most_every_look_every_seconds(monkeypatch):
    clock = Clock(monkeypatch)
    watch = blas_threads.CoreWatch(cores=2)
    clock.tick(wall=blas_threads.LOOK_EVERY / 2, cores=2, others=0.0, own=1.0)
    assert watch.update() == 1  # too soon to judge: an idle machine is not seen yet
    clock.tick(wall=blas_threads.LOOK_EVERY, cores=2, others=0.0, own=1.0)
    assert watch.update() == 2
    clock.tick(wall=blas_threads.LOOK_EVERY / 2, cores=2, others=1.0, own=1.0)
    assert watch.update() == 2  # the busy program has not been seen for long enough yet


def test_each_sampling_starts_where_the_last_ended_or_on_what_the_load_since_then_says(monkeypatch):
    clock = Clock(monkeypatch)
    monkeypatch.setattr(blas_threads, "WATCH", blas_threads.CoreWatch(cores=2))
    with threadpool_limits(2, user_api="blas"):
        with blas_threads.watch_for("cpu") as threads:
            assert threads.threads == 1  # nothing seen yet
            clock.tick(wall=1.0, cores=2, others=0.0, own=1.0)  # an idle machine
            threads.update()
            assert threads.threads == 2
        with blas_threads.watch_for("cpu") as threads:
            assert threads.threads == 2  # straight after: the last count
        clock.tick(wall=1.0, cores=2, others=1.0, own=0.0)  # between samplings, another program took a core
        with blas_threads.watch_for("cpu") as threads:
            assert threads.threads == 1  # judged before the first step


def blas_threads_now():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_sampling_restores_the_blas_thread_count_and_picks_the_same_tokens():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8), seed=0)
    prompt = numpy.zeros((1, 1), dtype=numpy.int64)
    with threadpool_limits(2, user_api="blas"):
        before = blas_threads_now()
        tokens = [int(t[0]) for t in stream(model, prompt, 20, temperature=0)]
        steps = stream(model, prompt, 20, temperature=0)
        next(steps)
        steps.close()  # a caller that stops early
        assert blas_threads_now() == before
    with threadpool_limits(1, user_api="blas"):
        assert [int(t[0]) for t in stream(model, prompt, 20, temperature=0)] == tokens
