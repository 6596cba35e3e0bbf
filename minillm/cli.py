"""What the command lines share: an argument parser whose errors are one line, and `run`, which turns
every error a command can meet into one line on stderr and an exit status.

Exit statuses, the same in every command for the same kind of error:
    0    done
    1    the run failed: data, a checkpoint, a file, the disk, a non-finite loss
    2    a usage error: an option value, or options that cannot work together (ConfigError, BackendError)
    130  interrupted by Ctrl-C (128 + SIGINT, as shells report it)
"""

import argparse
import codecs
import os
import re
import sys

from minillm import backend
from minillm.errors import CheckpointError, ConfigError, DataError, PretrainedError
from minillm.launch import INTERRUPTED
from minillm.readback import TrainingError
from minillm.tokenizers.bpe import TokenizerError
from minillm.tokenizers.char import UnknownCharactersError

DONE, FAILED, USAGE = 0, 1, 2
USAGE_ERRORS = (ConfigError, backend.BackendError)
RUN_ERRORS = (DataError, CheckpointError, PretrainedError, TrainingError, TokenizerError,
              UnknownCharactersError, OSError)


# A value that starts with "-" but is a number: argparse itself takes only -1 and -1.5 for numbers.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error prints one line (not the usage block) and exits with 2,
    and that -inf, -1e5 or -nan are read as (negative) numbers, not as unknown options."""

    def parse_known_args(self, args=None, namespace=None):
        # argparse would report "--lr -1e5" as a missing argument ("expected one argument") instead of a
        # value out of range: "--lr=-1e5", the same option and value, is one token it cannot misread.
        args = list(sys.argv[1:] if args is None else args)
        joined = []
        for arg in args:
            previous = joined[-1] if joined else ""
            if NEGATIVE_NUMBER.match(arg) and previous.startswith("--") and "=" not in previous and previous != "--":
                joined[-1] = f"{previous}={arg}"
            else:
                joined.append(arg)
        return super().parse_known_args(joined, namespace)

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: error: {one_line(message)} (see --help)\n")


class NamedOutput:
    """sys.stdout, whose write errors carry the name "standard output": a full disk or a closed pipe
    raises an OSError with no file name, which would leave the one-line error without a where."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as err:
            raise type(err)(err.errno, err.strerror, "standard output") from None

    def flush(self):
        try:
            self._stream.flush()
        except OSError as err:
            raise type(err)(err.errno, err.strerror, "standard output") from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run(prog, body, debug=False, after_error=None):
    """body()'s exit status (None is 0); any error it raises is one line on stderr and its status.

    With `debug`, an error is raised instead, for its traceback. An error marked
    reported_elsewhere (another process of the same job printed it) is not printed
    again. after_error(err, status), when given, runs once an error is reported:
    train.py ends an MPI job there.
    """
    if sys.stdout is None:  # started with it closed (`>&-`): a stream to drop the output into, not a traceback
        print(f"{prog}: note: standard output is closed; what would be printed there is dropped", file=sys.stderr)
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    stdout = sys.stdout
    replace_unencodable(stdout)
    sys.stdout = NamedOutput(stdout)
    try:
        status = body()
        sys.stdout.flush()
        return status or DONE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader (e.g. `head`) has gone: stop quietly, and point stdout at /dev/null so that
        # the flush at exit does not fail a second time. (Training never gets here: it outlives its
        # stdout, see training.outliving_the_terminal.)
        quiet_stdout()
        return FAILED
    except USAGE_ERRORS as err:
        if debug:
            raise
        return report(prog, err, err, USAGE, after_error)
    except RUN_ERRORS as err:
        if debug:
            raise
        text = err
        if isinstance(err, OSError):
            if err.filename == "standard output":
                quiet_stdout()
            text = oserror_text(err)
        return report(prog, err, text, FAILED, after_error)
    finally:
        sys.stdout = stdout


def replace_unencodable(stream):
    """Characters the stream's encoding lacks written as "?" rather than raised as a UnicodeEncodeError.

    A sample or a prompt can hold any character, and a console or a redirection to a file is not always
    UTF-8 (cp1252 on Windows, ASCII under LC_ALL=C): a "?" in a sample beats losing the run to it.
    A UTF-8 stream is left as it is, so that its bytes are exactly the text's.
    """
    encoding = getattr(stream, "encoding", None)
    if encoding and codecs.lookup(encoding).name != "utf-8" and hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace")


def report(prog, err, text, status, after_error):
    """Print the error's text as one line, unless another process reported it, then after_error; the status."""
    if not getattr(err, "reported_elsewhere", False):
        print(f"{prog}: error: {one_line(text)}", file=sys.stderr, flush=True)
    if after_error:
        after_error(err, status)
    return status


# Characters at which a terminal or str.splitlines starts a new line.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def one_line(message):
    """The message with any line break in it (from a file name or a value quoted as is) escaped."""
    return "".join(repr(char)[1:-1] if char in LINE_BREAKS else char for char in str(message))


def oserror_text(err):
    """An OSError as "PATH: reason" (the reason without its errno number)."""
    where = f"{err.filename}: " if err.filename is not None else ""
    return f"{where}{err.strerror or err}"


def quiet_stdout():
    """Point the process's standard output (the descriptor) at /dev/null, where what is still buffered,
    and the flush at exit, can go without failing."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
    except (OSError, AttributeError, ValueError):
        pass
