"""An installed (not editable) minillm, run from a folder that is not the checkout, has its commands:
python -m minillm.train and python -m minillm.generate, and the console scripts minillm-train and
minillm-generate, which train a model and sample it as train.py and generate.py do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--max-iters", "10", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
        "--eval-interval", "10", "--sample-tokens", "0", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv that sees this machine's packages (numpy, ...), with minillm itself installed into it from a copy
    of the source: what `pip install .` gives, with no checkout on the path."""
    folder = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(folder / "venv")], check=True)
    python = folder / "venv" / ("Scripts" if os.name == "nt" else "bin") / "python"
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                             str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return python, folder


def run(python, folder, *arguments):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([str(python), *arguments], cwd=folder, capture_output=True, text=True, env=env)


def test_the_installed_package_is_the_one_run(installed):
    python, folder = installed
    where = run(python, folder, "-c", "import minillm; print(minillm.__file__)")
    assert where.returncode == 0 and str(ROOT) not in where.stdout, where.stdout + where.stderr


def test_python_m_minillm_train_and_generate(installed):
    python, folder = installed
    trained = run(python, folder, "-m", "minillm.train", *TINY, "--out-dir", "out-m")
    assert trained.returncode == 0, trained.stderr
    assert (folder / "out-m" / "ckpt.npz").is_file()
    sampled = run(python, folder, "-m", "minillm.generate", "--ckpt", "out-m/ckpt.npz", "--max-new-tokens", "10")
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr


def test_the_console_scripts(installed):
    python, folder = installed
    scripts = python.parent
    trained = run(scripts / "minillm-train", folder, *TINY, "--out-dir", "out-scripts")
    assert trained.returncode == 0, trained.stderr
    sampled = run(scripts / "minillm-generate", folder, "--ckpt", "out-scripts/ckpt.npz", "--max-new-tokens", "10")
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr
