"""The sampling benchmark runs its rows (on a tiny model) and finds the same tokens on every path."""

import pytest

from minillm.bench import sampling
from minillm.bench.roofline import StreamingRate
from minillm.model import GPTConfig

BOUNDS = ("MB/token", "of streaming bound", f"batch {sampling.BATCH}: of bound")


@pytest.mark.parametrize("new_tokens", [24, 12], ids=["the window slides", "within the window"])
def test_a_row_times_every_run_and_they_agree_on_the_tokens(new_tokens):
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=16)
    rate = StreamingRate(1, stream_mib=1)
    row = sampling.row("tiny", config, new_tokens=new_tokens, rounds=2, transformers=None, streaming_rate=rate)
    assert len(row) == len(sampling.HEADERS)
    cells = dict(zip(sampling.HEADERS, row))
    assert cells["transformers tok/s"] == cells["vs transformers"] == "-"
    assert cells["same tokens"] == "yes"
    for column in ("cached tok/s", "uncached tok/s", "busy beside: tok/s", "busy, threads unwatched"):
        assert float(cells[column]) > 0
    tokens_per_second, gain = cells[f"batch {sampling.BATCH} tok/s"].split()
    assert float(tokens_per_second) > 0 and gain.startswith("(") and gain.endswith("x)")
    if new_tokens > config.block_size:  # each step a prefill of the whole window: no streaming bound
        assert all(cells[column] == "-" for column in BOUNDS)
    else:
        assert float(cells["MB/token"]) > 0
        assert all(cells[column].endswith("%") and float(cells[column][:-1]) >= 0 for column in BOUNDS[1:])
