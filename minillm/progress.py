"""Training progress: the bar or lines on the terminal, the JSONL log, and the loss-curve picture."""

import errno
import json
import os
import stat
import sys
from pathlib import Path

from minillm import system
from minillm.checkpoint import atomic_write
from minillm.cli import quiet_stdout

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"


class Progress:
    """Progress lines: a tqdm bar on a terminal, plain lines otherwise; plus the JSONL log."""

    def __init__(self, cfg, start_step, out_dir):
        self.log_path = Path(out_dir) / LOG_FILE
        # Each run's log describes that run alone: a new run starts it empty, a resumed
        # one keeps what came before its resume point (a later part was not saved).
        kept = lines_before(self.log_path, start_step)
        atomic_write(self.log_path, lambda f: f.write("".join(kept).encode("utf-8")))
        # Never through a symbolic link: its target would get our lines.
        self.log = open(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | system.NOFOLLOW), "a",
                        encoding="utf-8")
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.max_iters, initial=start_step, dynamic_ncols=True, unit="step")

    def print(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, entry):
        try:
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()
        except OSError as err:  # a full disk: the error names the log, not just the errno
            raise OSError(err.errno, err.strerror, str(self.log_path)) from None

    def report(self, entry):
        """A progress line: the log, and the bar's figures or a printed line."""
        self.record(entry)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.1e}",
                ms=f"{entry['ms_per_step']:.0f}", tok_s=f"{entry['tokens_per_s']:,.0f}",
            )
        else:
            self.print(
                f"step {entry['step']}: loss {entry['loss']:.4f}, grad norm {entry['grad_norm']:.3f}, "
                f"lr {entry['lr']:.2e}, {entry['ms_per_step']:.0f} ms/step, {entry['tokens_per_s']:,.0f} tokens/s"
            )

    def advance(self):
        """One step done: the bar moves on."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.log.close()


# A write to standard output fails with one of these once its reader has gone: a closed pipe
# (`train.py | head`) or a hung-up terminal (its window or SSH session closed).
READER_GONE = (errno.EPIPE, errno.EIO)


class OutlivedStdout:
    """sys.stdout during training, which outlives its reader: once a write finds the reader gone, the rest
    of the output is dropped and training goes on (log.jsonl still records every line of progress)."""

    def __init__(self, stream):
        self._stream = stream
        self.gone = False

    def write(self, text):
        self._unless_gone(self._stream.write, text)
        return len(text)

    def flush(self):
        self._unless_gone(self._stream.flush)

    def _unless_gone(self, call, *args):
        if self.gone:
            return
        try:
            call(*args)
        except OSError as err:
            if err.errno not in READER_GONE:
                raise
            self.gone = True
            quiet_stdout()  # the text still buffered, and the flush at exit, go to /dev/null instead

    def __getattr__(self, name):
        return getattr(self._stream, name)


class NoProgress:
    """Progress on the ranks of a job other than rank 0: they print and log nothing."""

    log_path = None

    def print(self, text):
        pass

    def record(self, entry):
        pass

    def report(self, entry):
        pass

    def advance(self):
        pass

    def close(self):
        pass


def lines_before(log_path, step):
    """The log's lines recorded before a run resumed at `step` went on from its saved state.

    Progress entries up to `step` came before that state was saved; the evaluation
    at `step` and all later entries are repeated by the resumed run. Only a regular
    file is read; a line that is not a log entry (one cut short by a killed run) is dropped.
    """
    try:
        if not stat.S_ISREG(os.lstat(log_path).st_mode):
            return []
        text = Path(log_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    kept = []
    for line in text.split("\n")[:-1]:  # what follows the last newline was cut short
        try:
            entry = json.loads(line)
            before = entry["step"] < step or ("loss" in entry and entry["step"] == step)
        except (ValueError, TypeError, KeyError):
            continue
        if before:
            kept.append(line + "\n")
    return kept


def entries_with(log_path, key):
    """{step: entry} of the log's entries that hold `key` (a later entry of the same step wins)."""
    found = {}
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(entry, dict) and key in entry:
            found[entry["step"]] = entry
    return found


def pyplot():
    """matplotlib.pyplot drawing into files (the Agg backend), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(log_path, png_path):
    """Train and val loss against step, from the log; returns False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    evals = entries_with(log_path, "val_loss")
    steps = sorted(evals)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [evals[s]["train_loss"] for s in steps], label="train")
    ax.plot(steps, [evals[s]["val_loss"] for s in steps], label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True
