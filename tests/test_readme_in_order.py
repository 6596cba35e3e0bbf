"""The README's commands in the order a reader meets them, run one after another in one folder, as from a fresh clone.

Every line of every ```bash block (each part of an `a && b` line on its own) is either run here, or skipped by
name in SKIPPED with the reason, so a new command cannot be left out unnoticed. The run lines are the minillm
commands (train.py, generate.py, python -m minillm.*) and the `echo ... > FILE` lines that make their files.

To be fast, train.py lines are rewritten: TINY_DEFAULTS go before the line's own flags, so that the README's own
options win where it gives them (argparse keeps the last value), and TINY_FORCED go after them, so that the number
of steps and the model's size stay tiny whatever the line asks. The other commands run as written.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run settings a README line may change.
TINY_DEFAULTS = "--eval-interval 10 --eval-iters 1 --sample-tokens 10 --threads 1 --batch-size 4"
# Steps and model size: always tiny, after the line's own flags.
TINY_FORCED = "--max-iters 10 --n-layer 1 --n-embd 16 --n-head 2 --block-size 16"

MINILLM = re.compile(r"^(python (train\.py|generate\.py|-m minillm\.\w+)\b|echo .* \| python generate\.py\b)")
MAKES_A_FILE = re.compile(r"^echo .* > [\w.]+$")

SKIPPED = {
    "pip install -e .": "installs the package: the tests run in an environment where it is installed",
    "pip install -e '.[test]'": "installs the package: the tests run in an environment where it is installed",
    "pytest": "the test suite itself",
    "pip install -e '.[mpi]'": "installs the package: the tests run in an environment where it is installed",
    "mpiexec -n 4 python train.py --preset small --batch-size 32":
        "4 MPI processes, more than a test may take; tests/ runs MPI training on its own",
    "mpiexec -f hosts -n 16 python train.py --preset small --batch-size 64 --zero 1":
        "needs a hosts file naming other machines",
    "scripts/demo_transfer.sh": "a demo of thousands of steps (results in BENCHMARKS.md)",
    "scripts/demo_addition.sh": "a demo of thousands of steps (results in BENCHMARKS.md)",
    "pip install -e '.[exercises]'": "installs the package: the tests run in an environment where it is installed",
}

# Run lines whose exit status in a fresh folder is not 0, as the README says.
EXPECTED_STATUS = {
    # `start linear` wrote a blank backward, and `check` exits 0 only when every gradient is right.
    "python -m minillm.exercises check linear": 1,
}


def readme_commands():
    """Each command of the README's bash blocks, in order: comments dropped, `a && b` split into a and b."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            commands += [part.strip() for part in line.split(" && ") if part.strip()]
    return commands


def tiny(command):
    """The command with train.py's tiny settings put in; other commands unchanged."""
    head, found, flags = command.partition("python train.py")
    if not found:
        return command
    return f"{head}python train.py {TINY_DEFAULTS}{flags} {TINY_FORCED}"


def test_each_readme_command_is_run_or_skipped_with_a_reason():
    unknown = [c for c in readme_commands() if c not in SKIPPED and not (MINILLM.search(c) or MAKES_A_FILE.match(c))]
    assert not unknown, f"README commands neither run nor skipped here: {unknown}"
    assert not set(SKIPPED) - set(readme_commands()), "SKIPPED names commands the README no longer has"
    assert set(EXPECTED_STATUS) <= set(readme_commands())


def test_tiny_settings_leave_the_readme_options_and_keep_the_model_tiny():
    args = shlex.split(tiny("python train.py --sample-tokens 0 --n-layer 12"))

    def last(flag):  # the value argparse keeps
        return args[len(args) - 1 - args[::-1].index(flag) + 1]

    assert last("--sample-tokens") == "0" and last("--eval-interval") == "10"
    assert last("--n-layer") == "1" and last("--max-iters") == "10"
    assert tiny("python generate.py --prompt x") == "python generate.py --prompt x"


def test_the_readme_commands_run_in_order_in_one_folder(tmp_path):
    for script in ("train.py", "generate.py"):
        shutil.copy(ROOT / script, tmp_path / script)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MPLBACKEND": "Agg"}
    ran = []
    for command in readme_commands():
        if command in SKIPPED:
            continue
        result = subprocess.run(["bash", "-c", tiny(command)], cwd=tmp_path, capture_output=True, text=True,
                                env=env, timeout=120)
        expected = EXPECTED_STATUS.get(command, 0)
        assert result.returncode == expected, (
            f"after {ran}:\n{tiny(command)}\nexited {result.returncode}, not {expected}\n{result.stderr}")
        ran.append(command)
    assert any("train.py" in c for c in ran) and any("generate.py" in c for c in ran)
    assert (tmp_path / "out" / "ckpt.npz").exists() and (tmp_path / "inspect").is_dir()
