"""The PyTorch side of the benchmarks, and how the training report reads the rest's floor.

The default-run benchmark (python -m minillm.bench.default_run) on a few steps, its PyTorch loop's
learning-rate schedule, the PyTorch model's initialisation, PyTorch's products alone (the step's
own, answered by its process), and bench/training.py's table row and verdict line.
"""

import math
import re

import pytest

from minillm.bench.training import speed_bound
from minillm.options import TrainConfig


def test_nanogpts_learning_rate_warms_up_from_its_first_step_and_decays_to_the_floor():
    torch_run = pytest.importorskip("minillm.bench.torch_run")
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000)
    assert torch_run.nanogpt_lr(0, cfg) == pytest.approx(1e-3 / 101)
    assert torch_run.nanogpt_lr(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert torch_run.nanogpt_lr(100, cfg) == pytest.approx(1e-3)
    assert torch_run.nanogpt_lr(1050, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half way: cos = 0
    assert torch_run.nanogpt_lr(2000, cfg) == pytest.approx(1e-4)
    assert torch_run.nanogpt_lr(2001, cfg) == 1e-4


def test_the_benchmark_times_both_runs_in_alternating_order(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from minillm.bench import default_run

    monkeypatch.setattr(default_run, "write_section", lambda title, body: (tmp_path / "section.md").write_text(body))
    default_run.main(["--rounds", "2", "--max-iters", "2", "--write"])
    printed = capsys.readouterr().out
    assert re.search(r"round 1: minillm [\d.]+ s \(val [\d.]+\), pytorch", printed)
    assert re.search(r"round 2: pytorch [\d.]+ s \(val [\d.]+\), minillm", printed)
    table = (tmp_path / "section.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| [12] ", line)]
    assert len(rows) == 2
    for row in rows:
        _, ours, theirs, ratio, our_loss, their_loss = [cell.strip() for cell in row.strip("|").split("|")]
        # The seconds are shown to 0.1 s, about 3% of these short runs: the ratio is of the unrounded ones.
        assert float(ratio[:-1]) == pytest.approx(float(ours) / float(theirs), rel=0.05)
        # A character model's loss after a few steps: below the uniform guess's log(vocabulary) + a margin.
        assert 0 < float(our_loss) < math.log(103) + 1 and 0 < float(their_loss) < math.log(103) + 1


def test_a_rest_floor_above_what_the_target_leaves_is_called_beyond_the_machine():
    # PyTorch 1.3 s, 1.3x wanted: a step of 1.0 s; products 0.9 s leave 0.1 s for the rest.
    beyond = speed_bound("small", 1.3, step_seconds=1.2, products_seconds=0.9, rest_floor_seconds=0.15,
                         torch_rest_seconds=0.4)
    assert "leaving 100 ms for the rest (now 300 ms, its floor 150 ms)" in beyond
    assert "beyond this machine" in beyond and "compiled" not in beyond
    within = speed_bound("small", 1.3, step_seconds=1.2, products_seconds=0.9, rest_floor_seconds=0.05,
                         torch_rest_seconds=0.05)
    assert "its floor 50 ms)" in within and "beyond" not in within and "compiled" not in within
    assert "no rest at all would reach" in speed_bound("small", 1.3, 1.2, 1.1, 0.05, 0.2)


def test_a_target_that_leaves_the_rest_less_than_pytorchs_own_says_how_much_less():
    # 100 ms left for the rest, where PyTorch's compiled layers take 250 ms for it.
    line = speed_bound("small", 1.3, step_seconds=1.2, products_seconds=0.9, rest_floor_seconds=0.05,
                       torch_rest_seconds=0.25)
    assert "beyond" not in line
    assert "2.5x less than PyTorch's compiled layers take for it (250 ms)" in line


def test_pytorchs_products_alone_are_the_steps_products():
    torch = pytest.importorskip("torch")
    from minillm.bench import roofline, torch_reference
    from minillm.model import GPTConfig

    config = GPTConfig(vocab_size=50, block_size=40, n_layer=2, n_head=2, n_embd=16)
    flops = []
    matmul = torch.matmul

    def counted(a, b, out):
        flops.append(2 * math.prod(a.shape) * b.shape[-1])
        return matmul(a, b, out=out)

    products = torch_reference.products_alone(config, batch_size=3, threads=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "matmul", counted)
        products()
    assert sum(flops) == roofline.training_flops(config, 3).products


def test_pytorchs_process_answers_a_step_and_its_products_alone():
    pytest.importorskip("torch")
    from minillm.bench.torch_reference import TorchProcess

    process = TorchProcess("baby", 1)
    try:
        process.step()
        process.products()
    finally:
        process.close()
    assert process._process.returncode == 0


def test_pytorchs_model_starts_from_gpt2s_initialisation_as_minillms_does():
    torch = pytest.importorskip("torch")
    from minillm.bench.torch_reference import TorchGPT
    from minillm.model import GPTConfig

    config = GPTConfig(vocab_size=500, block_size=64, n_layer=3, n_head=2, n_embd=64)
    torch.manual_seed(0)
    params = {name: p.detach() for name, p in TorchGPT(config).named_parameters()}
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in params.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif p.dim() == 1:
            assert torch.all(p == 1), name  # LayerNorm gains
        else:
            expected = residual if name.endswith("proj.weight") else 0.02
            assert float(p.std()) == pytest.approx(expected, rel=0.1), name
            assert abs(float(p.mean())) < expected / 5, name
    assert {name for name in params if name.endswith("proj.weight")} == {
        f"blocks.{i}.{kind}_proj.weight" for i in range(config.n_layer) for kind in ("attn", "mlp")}


def test_the_training_tables_row_from_measured_times_with_and_without_pytorch():
    from minillm.bench import training
    from minillm.bench.roofline import Ceilings

    ceilings = Ceilings(matmul_gflops=300.0, matvec_gbps=30.0, elementwise_gbps=13.0)
    ours = {"minillm": [0.050, 0.040, 0.060], "products alone": [0.020] * 3, "eval": [0.015, 0.012, 0.020]}
    theirs = {"pytorch": [0.040, 0.036, 0.048], "pytorch products alone": [0.016] * 3}
    memory = (10 * 2**20, 60 * 2**20)
    row, bound = training.report_row("baby", {"times": ours, "memory": memory}, ceilings)
    cells = dict(zip(training.HEADERS, row))
    assert bound is None and cells["PyTorch ms"] == cells["speed"] == "-"
    assert cells["minillm ms"] == "50" and cells["products alone ms"] == "20" and cells["the rest ms"] == "30"
    assert cells["eval / step"] == "0.30"
    assert cells["memory: measured / analytic"].startswith("50 / ")

    row, bound = training.report_row("baby", {"times": ours | theirs, "memory": memory}, ceilings)
    cells = dict(zip(training.HEADERS, row))
    assert cells["PyTorch ms"] == "40" and cells["speed"] == "0.80x"  # each round's ratio, then their median
    assert cells["PyTorch: products alone + the rest ms"] == "16 + 24"
    # 1.3x PyTorch's 40 ms: a step of 31 ms, leaving 11 ms after the products; PyTorch's rest takes 24.
    assert bound.startswith("- baby: 1.3x PyTorch's 40 ms needs a step of at most 31 ms")
    assert "2.2x less than PyTorch's compiled layers take for it (24 ms)" in bound
