"""The README's command examples, run as written, in a folder whose out/ holds a tiny trained checkpoint."""

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minillm import generate_cli
from minillm.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
# Examples that need no more than a checkpoint in out/: the training and the demos are run elsewhere.
RUNNABLE = re.compile(r"python (generate\.py|-m minillm\.gradcheck)\b")


def readme_examples():
    """Each command line of the README's bash blocks that RUNNABLE matches."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if RUNNABLE.search(line)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A user's folder: the two scripts, out/ckpt.npz from a short run (and out-bpe/ckpt.npz, a BPE one, as in
    "Your own data"), and a prompt file."""
    folder = tmp_path_factory.mktemp("user")
    for script in ("train.py", "generate.py"):
        shutil.copy(ROOT / script, folder / script)
    tiny = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=30, eval_interval=30,
                eval_iters=1, sample_tokens=0, device="cpu", threads=1)
    train(TrainConfig(out_dir=str(folder / "out"), **tiny))
    train(TrainConfig(out_dir=str(folder / "out-bpe"), tokenizer="bpe", vocab_size=300, **tiny))
    (folder / "prompt.txt").write_text("The \n")
    return folder


def run_as_written(command, folder):
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PATH": path})


def test_the_readme_has_examples_to_run():
    examples = readme_examples()
    assert any("--stop" in line for line in examples) and any(line.startswith("echo") for line in examples)


@pytest.mark.parametrize("command", readme_examples())
def test_each_readme_example_runs_as_written(command, folder):
    result = run_as_written(command, folder)
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    assert result.stdout.strip()


def test_the_check_your_own_gradients_example_runs_as_written(tmp_path):
    """The README's python block with a check_layer test, saved as a file and run by pytest, passes."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    example = [block for block in blocks if "check_layer(" in block and "def test_" in block]
    assert len(example) == 1
    (tmp_path / "test_rmsnorm.py").write_text(example[0])
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_rmsnorm.py"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def test_a_prompt_from_echo_is_the_same_as_the_prompt_typed(folder):
    piped = run_as_written('echo "Class " | python generate.py --prompt - --temperature 0 --max-new-tokens 20', folder)
    typed = run_as_written('python generate.py --prompt "Class " --temperature 0 --max-new-tokens 20', folder)
    assert piped.returncode == typed.returncode == 0
    assert piped.stdout == typed.stdout


def test_stop_texts_take_the_usual_escapes_as_a_shell_passes_them():
    args = generate_cli.parse_args(["--stop", r"\n\n", "--stop", r"a\tb\\n", "--stop", r"\q"])
    assert args.stop == ["\n\n", "a\tb\\n", r"\q"]


def test_one_final_newline_of_a_prompt_from_standard_input_is_dropped(monkeypatch):
    for given, prompt in (("Class \n", "Class "), ("two\n\n", "two\n"), ("none", "none")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(given.encode()), encoding="utf-8"))
        assert generate_cli.parse_args(["--prompt", "-"]).prompt == prompt
