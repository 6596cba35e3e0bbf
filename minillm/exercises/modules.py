"""Fresh modules from files, and a learner's errors shown as theirs.

Each load executes the file again into a new module object that is not put in sys.modules: a
learner who edits a file and checks it again, in the same process, gets the edited code, and two
loads never share state. The same holds for the private copies of reference modules that get their
module-level layers (linear, softmax, ...) rebound: minillm.layers itself is never touched.
"""

import linecache
import traceback
import types
from pathlib import Path

from minillm.exercises.catalog import ExerciseError


class LearnerError(Exception):
    """An error in a learner's file, as lines to print: their frames only, then the exception's line."""

    def __init__(self, lines, reason):
        super().__init__("\n".join(lines))
        self.lines = lines
        self.reason = reason  # a few words for a status: "SyntaxError at line 3"


def load(path, shown=None, name=None):
    """A new module executed from the file at `path`, called `name` (default: the file's stem, so that a
    report names a learner's functions as "linear.forward").

    `shown` is the path as the learner named it, for the messages. A syntax error or an exception
    while the module runs is a LearnerError; a file that is not there is an ExerciseError.
    """
    path = Path(path)
    shown = shown or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExerciseError(f"{shown}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ExerciseError(f"{shown}: cannot be read: {err}") from None
    filename = str(path.resolve())
    try:
        code = compile(text, filename, "exec")
    except SyntaxError as err:
        raise LearnerError([f"{shown}:{err.lineno}: {type(err).__name__}: {err.msg}"],
                           f"{type(err).__name__} at line {err.lineno}") from None
    module = types.ModuleType(name or path.stem)
    module.__file__ = filename
    # The traceback of an error while it runs reads the file's lines: drop any copy of an older version.
    linecache.checkcache(filename)
    try:
        exec(code, module.__dict__)
    except Exception as err:
        raise learner_error(err, module, shown, "while the file runs") from None
    return module


def learner_error(err, module, shown, where):
    """A LearnerError of `err`, raised by code of `module`: the frames in its file only (the checker's own, and
    NumPy's, are noise to a learner), then the exception's line."""
    filename = module.__file__
    linecache.checkcache(filename)
    frames = [frame for frame in traceback.extract_tb(err.__traceback__) if frame.filename == filename]
    lines = [f"{shown}: {type(err).__name__} {where}" + (":" if frames else ", outside your file:")]
    for frame in frames:
        lines.append(f'  File "{shown}", line {frame.lineno}, in {frame.name}')
        if frame.line:
            lines.append(f"    {frame.line.strip()}")
    lines += traceback.format_exception_only(type(err), err)[-1:]
    lines[-1] = lines[-1].rstrip("\n")
    reason = f"{type(err).__name__} at line {frames[-1].lineno}" if frames else type(err).__name__
    return LearnerError(lines, reason)
