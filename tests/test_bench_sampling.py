"""The sampling benchmark runs its rows (on a tiny model) and finds the same tokens on every path."""

from minillm.bench import sampling
from minillm.model import GPTConfig


def test_a_row_times_every_run_and_they_agree_on_the_tokens():
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=16)
    row = sampling.row("tiny", config, new_tokens=24, rounds=2, transformers=None)  # the window slides too
    assert len(row) == len(sampling.HEADERS)
    cells = dict(zip(sampling.HEADERS, row))
    assert cells["transformers tok/s"] == cells["vs transformers"] == "-"
    assert cells["same tokens"] == "yes"
    for column in ("cached tok/s", "uncached tok/s", "busy beside: tok/s", "busy, threads unwatched"):
        assert float(cells[column]) > 0
