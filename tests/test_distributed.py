"""Data parallelism over MPI: ranks that each take part of a batch give the whole batch's step.

These tests start MPI themselves (mpiexec, from the mpich wheel of the test extra) and
run tests/distributed_worker.py or train.py on two ranks, each for a few seconds.
They are skipped, saying why, only where mpi4py or mpiexec cannot be found.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from minillm import checkpoint, distributed, training
from minillm.model import GPT
from minillm.optim import AdamW
from minillm.readback import NonfiniteWatch
from minillm.sampling import generate

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = next(
    (str(p) for p in (Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec")) if p and Path(p).is_file()),
    None,
)
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and an mpiexec: pip install -e '.[mpi]' (its mpich wheel exists for Linux and macOS only)",
)
TINY = dict(
    n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, dropout=0.1,
    max_iters=12, warmup_iters=2, lr_decay_iters=12, eval_interval=6, eval_iters=2,
    save_interval=3, log_interval=4, sample_tokens=8, device="cpu",
)


def flags(**overrides):
    return [f for name, value in {**TINY, **overrides}.items() for f in (f"--{name.replace('_', '-')}", str(value))]


def without_launcher():
    """This environment less any MPI launcher's variables (pytest itself may run under one)."""
    return {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_RANK_VARIABLES}


def mpiexec(ranks, *command, timeout=120):
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *command], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=without_launcher())


def one_process_steps(zero, accum, device="cpu"):
    """worker.train_steps' configuration in this process alone, each step on the whole batches."""
    model = GPT(worker.CONFIG, seed=0, dtype="float64", device=device)
    cfg = training.TrainConfig(grad_accum=accum, grad_clip=0.5, lr=1e-2, warmup_iters=0, max_iters=worker.STEPS)
    optimizer = AdamW(model.trainable_params(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    recorded, step_of = {}, optimizer.step
    optimizer.step = lambda grads, lr: (recorded.update({n: g.copy() for n, g in grads.items()}), step_of(grads, lr))
    watch = NonfiniteWatch(device, model.dtype, "out")
    for step in range(worker.STEPS):
        micro = iter(worker.fixed_batches(step, accum))
        training.train_step(model, optimizer, lambda rng: next(micro), step, cfg, watch)
    return model.params, recorded


@needs_mpi
def test_two_ranks_each_taking_part_of_the_batch_give_one_process_whole_batch_step(tmp_path):
    """Rows split 3 + 2, unequal counted targets; with and without --zero 1, --grad-accum 1 and 2."""
    result = mpiexec(2, "tests/distributed_worker.py", "steps", str(tmp_path / "steps.npz"))
    assert result.returncode == 0, result.stderr
    got = numpy.load(tmp_path / "steps.npz")
    for zero, accum in worker.SETTINGS:
        params, grads = one_process_steps(zero, accum)
        for name in params:
            for what, expected in (("grads", grads[name]), ("params", params[name])):
                numpy.testing.assert_allclose(got[f"{zero}/{accum}/{what}/{name}"], expected, rtol=0, atol=1e-12,
                                              err_msg=f"--zero {zero} --grad-accum {accum}: {what} of {name}")


@needs_mpi
def test_parameters_stay_bit_identical_across_ranks_that_draw_their_own_rows(tmp_path):
    result = mpiexec(2, "tests/distributed_worker.py", "identical", str(tmp_path / "identical.json"))
    assert result.returncode == 0, result.stderr
    outcome = json.loads((tmp_path / "identical.json").read_text())
    assert outcome == {zero: {"same_params": True, "distinct_rows": True} for zero in ("0", "1")}


@needs_mpi
def test_train_py_on_two_ranks_writes_one_run_that_one_process_samples_and_resumes(tmp_path, corpus):
    out = tmp_path / "out"
    result = mpiexec(2, "train.py", "--data", str(corpus), "--out-dir", str(out), *flags())
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("step 6: evaluating") == 1  # rank 0 alone prints
    assert "ranks: 2 processes" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "val_loss" in e] == [0, 6, 12]
    model, tokenizer, meta, _ = checkpoint.load(out / "ckpt.npz")
    assert len(tokenizer.decode(generate(model, numpy.array([[0]]), 5, temperature=0)[0])) == 6

    resumed = subprocess.run([sys.executable, "train.py", "--out-dir", str(out), "--resume", "--max-iters", "15"],
                             capture_output=True, text=True, cwd=ROOT, env=without_launcher())
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 12" in resumed.stdout
    assert checkpoint.read_meta(out / "last.npz")["step"] == 15


@needs_mpi
def test_zero_1_checkpoints_are_the_same_file_whatever_the_rank_count(tmp_path, corpus):
    common = ["--data", str(corpus), *flags()]
    straight, split, alone = tmp_path / "straight", tmp_path / "split", tmp_path / "alone"
    for command in (
        (2, "--out-dir", straight, "--zero", "1"),
        (2, "--out-dir", split, "--zero", "1", "--max-iters", "6"),
    ):
        result = mpiexec(command[0], "train.py", *common, *map(str, command[1:]))
        assert result.returncode == 0, result.stderr
    one = subprocess.run([sys.executable, "train.py", *common, "--out-dir", str(alone), "--max-iters", "6"],
                         capture_output=True, text=True, cwd=ROOT, env=without_launcher())
    assert one.returncode == 0, one.stderr
    sharded, _ = checkpoint.read_arrays(split / "last.npz")
    whole, _ = checkpoint.read_arrays(alone / "last.npz")
    assert {(k, v.shape, v.dtype) for k, v in sharded.items()} == {(k, v.shape, v.dtype) for k, v in whole.items()}

    shutil.copytree(split, tmp_path / "on_one")
    result = mpiexec(2, "train.py", "--out-dir", str(split), "--resume", "--max-iters", "12")
    assert result.returncode == 0, result.stderr
    expected, _ = checkpoint.read_arrays(straight / "last.npz")
    got, _ = checkpoint.read_arrays(split / "last.npz")
    for name in expected:  # the same rank count resumes bit-exactly
        assert numpy.array_equal(expected[name], got[name]), name
    result = mpiexec(1, "train.py", "--out-dir", str(tmp_path / "on_one"), "--resume", "--max-iters", "9")
    assert result.returncode == 0, result.stderr
    assert "note: --zero 1" in result.stdout
    assert checkpoint.read_meta(tmp_path / "on_one" / "last.npz")["step"] == 9


@needs_mpi
def test_one_rank_under_mpiexec_ends_bit_identical_to_a_plain_run(tmp_path, corpus):
    options = ["--data", str(corpus), *flags(max_iters=6, eval_interval=3, threads=2, grad_accum=2)]
    plain = subprocess.run([sys.executable, "train.py", *options, "--out-dir", str(tmp_path / "plain")],
                           capture_output=True, text=True, cwd=ROOT, env=without_launcher())
    assert plain.returncode == 0, plain.stderr
    ranked = mpiexec(1, "train.py", *options, "--out-dir", str(tmp_path / "ranked"))
    assert ranked.returncode == 0, ranked.stderr
    assert "ranks: 1 process takes each batch" in ranked.stdout
    expected, _ = checkpoint.read_arrays(tmp_path / "plain" / "last.npz")
    got, _ = checkpoint.read_arrays(tmp_path / "ranked" / "last.npz")
    for name in expected:
        assert numpy.array_equal(expected[name], got[name]), name


@needs_mpi
def test_a_batch_that_cannot_be_split_is_one_line_before_anything_is_written(tmp_path, corpus):
    result = mpiexec(2, "train.py", "--data", str(corpus), "--out-dir", str(tmp_path / "out"), *flags(batch_size=1))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train.py: error: --batch-size 1 cannot be split across 2 processes: give each at least one row "
        "(--batch-size 2 or more) or start fewer processes"
    ]
    assert not (tmp_path / "out").exists()


@needs_mpi
def test_a_non_finite_step_stops_every_rank_with_one_line(tmp_path, corpus):
    result = mpiexec(2, "train.py", "--data", str(corpus), "--out-dir", str(tmp_path), *flags(lr=1e30, grad_clip=0))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("train.py: error: step ") and "Try a lower --lr" in line


@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill", "setup"])
def test_a_rank_that_fails_alone_ends_the_job(tmp_path, corpus, how):
    result = mpiexec(2, "tests/distributed_worker.py", "dies", how, "--data", str(corpus),
                     "--out-dir", str(tmp_path), *flags(max_iters=100_000, eval_interval=100_000), timeout=60)
    assert result.returncode != 0
    if how == "raise":
        assert "RuntimeError: rank 1 broke down" in result.stderr
    if how == "setup":  # shared before any exchange: every rank stops, one line says why
        assert result.stderr.strip().splitlines() == ["train.py: error: rank 1 cannot read its data"]


@needs_mpi
def test_a_usage_error_is_one_line_from_rank_0(tmp_path, corpus):
    result = mpiexec(2, "train.py", "--data", str(corpus), "--out-dir", str(tmp_path), "--lr", "fast")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train.py: error: argument --lr: invalid float value: 'fast' (see --help)"
    ]


@needs_mpi
def test_two_ranks_evaluating_their_share_of_the_batches_give_one_process_loss(tmp_path):
    """MPI evaluation: N ranks' val loss equals one process's on the same batches (each evaluates its share)."""
    result = mpiexec(2, "tests/distributed_worker.py", "evaluate", str(tmp_path / "loss.json"))
    assert result.returncode == 0, result.stderr
    got = json.loads((tmp_path / "loss.json").read_text())["loss"]
    alone = training.estimate_loss(GPT(worker.CONFIG, seed=0, dtype="float64"), worker.eval_batches())
    assert got == pytest.approx(alone, rel=1e-12, abs=0)


@needs_mpi
def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step_with_one_saved_state(tmp_path, corpus):
    """Ctrl-C: the ranks agree to stop, so a Ctrl-C that reaches one rank only stops every rank at the same
    step, and rank 0 saves that step's state in last.npz for --resume."""
    out, report = tmp_path / "out", tmp_path / "report"
    command = [MPIEXEC, "-n", "2", sys.executable, "tests/distributed_worker.py", "interrupt", str(report),
               "--data", str(corpus), "--out-dir", str(out),
               *flags(max_iters=100_000, eval_interval=100_000, save_interval=100_000)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=without_launcher(), start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the ranks that did not stop wait for the one that did
        job.communicate()
        pytest.fail("the ranks did not all stop after a Ctrl-C reached rank 1")
    assert job.returncode == 130, stderr
    assert stdout.count("stopped at step 4; saved") == 1, stdout
    reports = [json.loads((tmp_path / f"report.{rank}.json").read_text()) for rank in (0, 1)]
    assert reports == [{"steps": [0, 1, 2, 3], "status": 130}] * 2
    assert checkpoint.read_meta(out / "last.npz")["step"] == 4


@pytest.mark.parametrize("rank", ["0", "1"])
def test_launched_by_mpiexec_without_mpi4py_is_one_line_from_rank_0(tmp_path, corpus, rank):
    blocked = ("import sys; sys.modules['mpi4py'] = None; "
               "from minillm.train_cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", blocked, "--data", str(corpus), "--out-dir", str(tmp_path), *flags()],
        capture_output=True, text=True, cwd=ROOT, env={**without_launcher(), "PMI_RANK": rank, "PMI_SIZE": "2"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == (
        ["train.py: error: this process was started by an MPI launcher (mpiexec), but mpi4py is not installed: "
         'pip install -e ".[mpi]" (mpi4py and MPICH), or install mpi4py for your cluster\'s MPI'] if rank == "0" else []
    )


def test_alone_nothing_imports_mpi4py_and_zero_1_is_a_note(tmp_path, corpus):
    script = ("import sys; from minillm.train_cli import main; code = main(sys.argv[1:]); "
              "print('mpi4py imported' if 'mpi4py' in sys.modules else 'mpi4py not imported'); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, "--data", str(corpus), "--out-dir", str(tmp_path),
                             *flags(max_iters=2, zero=1)], capture_output=True, text=True, cwd=ROOT,
                            env=without_launcher())
    assert result.returncode == 0, result.stderr
    assert "note: --zero 1 shards the optimizer state across processes" in result.stdout
    assert result.stdout.rstrip().endswith("mpi4py not imported")


def test_zero_must_be_0_or_1(tmp_path, corpus):
    result = subprocess.run([sys.executable, "train.py", "--data", str(corpus), "--out-dir", str(tmp_path),
                             *flags(zero=2)], capture_output=True, text=True, cwd=ROOT, env=without_launcher())
    assert result.returncode == 2
    assert "--zero must be 0 (off) or 1" in result.stderr


@needs_mpi
def test_one_rank_on_a_gpu_sums_through_nccl_as_one_process_would(tmp_path):
    """The GPU path (scripts/gpu_check.sh): NCCL's allreduce, reduce-scatter and allgather on one rank."""
    from minillm import backend

    if not backend.cuda_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    result = mpiexec(1, "tests/distributed_worker.py", "steps", str(tmp_path / "steps.npz"), "cuda")
    assert result.returncode == 0, result.stderr
    got = numpy.load(tmp_path / "steps.npz")
    for zero, accum in worker.SETTINGS:
        params, grads = one_process_steps(zero, accum, "cuda")
        for name in params:
            for what, expected in (("grads", grads[name]), ("params", params[name])):
                numpy.testing.assert_allclose(got[f"{zero}/{accum}/{what}/{name}"], backend.to_host(expected),
                                              rtol=0, atol=1e-12, err_msg=f"{what} of {name}")
    run = mpiexec(1, "train.py", "--out-dir", str(tmp_path / "out"), *flags(device="cuda", max_iters=6))
    assert run.returncode == 0, run.stderr
    assert "gradients summed through NCCL" in run.stdout


def test_the_alpha_beta_model_of_the_scaling_benchmark():
    """A ring allreduce is a reduce-scatter and an allgather; its bandwidth term tends to 2 M / beta."""
    from minillm.bench.scaling import model_rows, ring_seconds

    megabyte, beta = 1e6, 1e9
    assert ring_seconds(2, megabyte, 0.0, beta) == pytest.approx(megabyte / beta)
    assert ring_seconds(8, megabyte, 1e-5, beta) == pytest.approx(2 * ring_seconds(8, megabyte, 1e-5, beta, rounds=1))
    assert ring_seconds(4096, megabyte, 0.0, beta) == pytest.approx(2 * megabyte / beta, rel=1e-3)
    rows = {(n, zero): (step, exchange) for n, zero, step, exchange, _, _ in model_rows(1.0, 0.25, 1e6, 100)}
    assert rows[(1, "no")] == (1.0, 0.0)
    for n in (8, 64, 512):  # ZeRO-1: a little more latency, 1/n of the update
        assert rows[(n, "yes")][1] > rows[(n, "no")][1]
        assert rows[(n, "yes")][0] == pytest.approx(rows[(n, "no")][0] - 0.25 * (1 - 1 / n)
                                                    + rows[(n, "yes")][1] - rows[(n, "no")][1])
