"""The BLAS thread count while sampling: one per core that other programs leave idle, restored afterwards."""

import numpy
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from minillm import blas_threads
from minillm.model import GPT, GPTConfig
from minillm.sampling import stream


class Clock:
    """Scripted clock() and busy_seconds(): each tick moves the wall clock, the machine's busy time and ours."""

    def __init__(self, monkeypatch):
        self.wall, self.busy, self.own = 100.0, 50.0, 5.0
        monkeypatch.setattr(blas_threads, "clock", lambda: self.wall)
        monkeypatch.setattr(blas_threads, "busy_seconds", lambda: (self.busy, self.own))

    def tick(self, wall, busy, own):
        self.wall, self.busy, self.own = self.wall + wall, self.busy + busy, self.own + own


@pytest.mark.parametrize("cores, others, expected", [
    (2, 0.0, 2), (2, 0.5, 2), (2, 0.8, 1), (2, 1.0, 1), (2, 2.0, 1), (8, 3.0, 5), (8, 2.6, 6), (8, 0.0, 8),
])
def test_threads_follow_the_cores_other_programs_leave_idle(monkeypatch, cores, others, expected):
    clock, chosen = Clock(monkeypatch), []
    watch = blas_threads.CoreWatch(cores, chosen.append, cores=cores)
    assert chosen == [1]  # one thread (the default start) until the load has been seen
    clock.tick(wall=0.5, busy=0.5 * (others + 1.0), own=0.5)  # we used one core, the others `others`
    watch.update()
    assert watch.threads == expected and chosen[-1] == expected


def test_the_load_is_read_at_most_every_look_every_seconds(monkeypatch):
    clock, chosen = Clock(monkeypatch), []
    watch = blas_threads.CoreWatch(2, chosen.append, cores=2)
    clock.tick(wall=blas_threads.LOOK_EVERY / 2, busy=0.0, own=0.0)
    watch.update()
    assert watch.threads == 1  # too soon to judge: an idle machine is not seen yet
    clock.tick(wall=blas_threads.LOOK_EVERY, busy=0.0, own=0.0)
    watch.update()
    assert watch.threads == 2 and chosen == [1, 2]


def test_a_watch_starts_on_the_count_it_is_given_and_sampling_remembers_its_last(monkeypatch):
    clock, chosen = Clock(monkeypatch), []
    blas_threads.CoreWatch(4, chosen.append, cores=4, start=3)
    assert chosen == [3]
    monkeypatch.setitem(blas_threads.LAST_CHOICE, "threads", 1)
    with threadpool_limits(2, user_api="blas"), blas_threads.watch_for("cpu") as watch:
        clock.tick(wall=1.0, busy=0.0, own=0.0)  # an idle machine
        watch.update()
        assert watch.threads == 2
    assert blas_threads.LAST_CHOICE["threads"] == 2


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
