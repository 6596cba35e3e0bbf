"""How train.py and generate.py start: a Ctrl-C at any moment, while the modules import included,
exits with status 130 (128 + SIGINT, as shells report it) and no traceback.

An installed minillm (no checkout, so no train.py beside it) starts the same commands as
`python -m minillm.train` / `python -m minillm.generate`, or the console scripts `minillm-train`
and `minillm-generate` (train() and generate() below).

This module imports only the standard library, so that it is loaded before NumPy, whose import
turns a Ctrl-C into an ImportError that no later handler could tell from a broken install.
"""

import importlib
import signal
import sys

INTERRUPTED = 130


def run_command(module_name):
    """Import the command's module, then exit with the status of its main().

    A Ctrl-C during the import is noted and acted on once the import is done.
    """
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        module = importlib.import_module(module_name)
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        sys.exit(INTERRUPTED)
    try:
        sys.exit(module.main())
    except KeyboardInterrupt:  # between the import and main()'s own handling of it
        sys.exit(INTERRUPTED)


def train():
    """The console script minillm-train: train.py's command."""
    run_command("minillm.train_cli")


def generate():
    """The console script minillm-generate: generate.py's command."""
    run_command("minillm.generate_cli")
