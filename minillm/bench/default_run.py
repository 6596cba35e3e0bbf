"""The whole default run against nanoGPT's loop in PyTorch: python -m minillm.bench.default_run [--write]

Each round runs `python train.py` in a fresh out dir (start-up, token files, 2,000 steps,
evaluations, checkpoints, samples) and bench/torch_run.py (nanoGPT's CPU command, rebuilt in
PyTorch, on token files train.py made once beforehand), each in a process of its own, one after
the other; the wall time of each process is timed from start to exit. The order of the two
alternates from round to round, so neither always runs first on a machine that drifts. Run it
from the project's root, where train.py is.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minillm.bench.common import format_table, write_section
from minillm.bench.training import installed_version
from minillm.options import TrainConfig

TITLE = "The default run against nanoGPT's loop in PyTorch"
VAL_LOSS = re.compile(r"val loss (\d+\.\d+)")


def timed_process(command):
    """(seconds from start to exit, the last val loss the process printed) of one command."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds, float(VAL_LOSS.findall(result.stdout)[-1])


def one_round(folder, number, max_iters):
    """{'minillm': (s, val loss), 'pytorch': (s, val loss)} of one round; train.py gets a fresh out dir."""
    out_dir = str(Path(folder) / f"round{number}")
    ours = [sys.executable, "train.py", "--out-dir", out_dir, "--max-iters", str(max_iters)]
    theirs = [sys.executable, "-m", "minillm.bench.torch_run", str(Path(folder) / "tokens"), str(max_iters)]
    order = [("minillm", ours), ("pytorch", theirs)]
    return dict((name, timed_process(command)) for name, command in order[:: 1 if number % 2 == 0 else -1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.default_run", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-iters", type=int, default=TrainConfig.max_iters, help="steps of both runs (a test's)")
    parser.add_argument("--write", action="store_true", help=f"put the table into BENCHMARKS.md under '{TITLE}'")
    args = parser.parse_args(argv)
    if installed_version("torch") is None:
        sys.exit("python -m minillm.bench.default_run: PyTorch is not installed; pip install torch")
    if not Path("train.py").is_file():
        sys.exit("python -m minillm.bench.default_run: no train.py here; run it from the project's root")
    with tempfile.TemporaryDirectory() as folder:
        # The token files PyTorch's runs read, made once, untimed (train.py makes its own in each round).
        make_tokens = [sys.executable, "train.py", "--out-dir", str(Path(folder) / "tokens"), "--max-iters", "0"]
        subprocess.run(make_tokens, capture_output=True, check=True)
        rounds = []
        for number in range(args.rounds):
            rounds.append(one_round(folder, number, args.max_iters))
            print(f"round {number + 1}: " + ", ".join(f"{name} {s:.1f} s (val {loss:.4f})"
                                                      for name, (s, loss) in rounds[-1].items()))
    rows = [[i + 1, f"{r['minillm'][0]:.1f}", f"{r['pytorch'][0]:.1f}", f"{r['minillm'][0] / r['pytorch'][0]:.2f}x",
             f"{r['minillm'][1]:.4f}", f"{r['pytorch'][1]:.4f}"] for i, r in enumerate(rounds)]
    ratio = statistics.median(r["minillm"][0] / r["pytorch"][0] for r in rounds)
    table = format_table(["round", "minillm s", "PyTorch, nanoGPT's loop s", "minillm / PyTorch",
                          "minillm val loss", "PyTorch val loss"], rows)
    body = f"""{table}

Median over the rounds of minillm's wall time over PyTorch's: {ratio:.2f}x (at most 0.75x is the aim).
minillm: `python train.py` in a fresh out dir, the whole command (start-up, the token files, {args.max_iters:,} steps,
an evaluation of 20 batches per split every 250, checkpoints, the samples it prints). PyTorch
{installed_version("torch")}: `python -m minillm.bench.torch_run OUT_DIR`, nanoGPT's loop for its CPU command
rebuilt on the same token files, model shape and hyperparameters (bench/torch_run.py says what it
reproduces), eager mode on PyTorch's own threads; it does not print samples. Each in a process of
its own, one after the other, their order alternating between rounds; the val loss is each one's last
evaluation (20 batches per split; the two runs draw different batches).
"""
    print(body)
    if args.write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
