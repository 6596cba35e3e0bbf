"""Reading the files a user names: regular files only, small ones with a size cap, JSON without crashing.

Every path a user gives (a config, a prompt file, a corpus, a tokenizer, a checkpoint)
is read through `open_regular`, which opens without blocking and then checks what it
opened: a FIFO or a device is refused before a single byte is read (a FIFO would
block forever, /dev/zero would fill memory), and so is a folder, a link loop or a
missing file, each named as what it is. Files that are small by nature are read
with `read_small`, which refuses one larger than its cap before reading it.

Errors are raised as the caller's own error class (`error=`), with a one-line
message that starts with the path, so each command reports them as it reports
its other errors.
"""

import errno
import json
import os
import stat

from minillm import system

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# What a name can point at, other than a regular file, as a user would call it.
KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
OPEN_ERRORS = {
    errno.ENOENT: "no such file",
    errno.ELOOP: "a symbolic link that loops (or too many links in a row)",
    errno.EACCES: "permission denied",
    errno.ENOTDIR: "a path through something that is not a folder",
    errno.ENAMETOOLONG: "a name too long for the file system",
}


def kind_of(mode):
    """What a stat mode describes, in words ("a regular file", "a FIFO (named pipe)", ...)."""
    for test, name in KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def describe_oserror(err):
    """An OSError as a short phrase: the reason, without errno numbers."""
    return OPEN_ERRORS.get(err.errno) or err.strerror or str(err)


def open_regular(path, error, expected="a file"):
    """A binary file object of the regular file `path`, or `error` naming what the path is instead.

    Opened with O_NONBLOCK where the system has it (Windows has no FIFOs), so that opening a
    FIFO returns at once; the descriptor is checked with fstat (not the name, which could
    change in between) before reading.
    """
    flags = os.O_RDONLY | system.NONBLOCK | system.CLOEXEC | system.BINARY
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise error(f"{path}: {describe_oserror(err)}; expected {expected}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: {kind_of(mode)}, not a regular file; expected {expected}")
        if system.NONBLOCK:  # Windows' set_blocking takes only pipes
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, error, expected="a file", limit=None):
    """The bytes of a regular file (see open_regular), refused unread when it has more than `limit` bytes."""
    with open_regular(path, error, expected) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise error(f"{path}: {size:,} bytes, more than the {limit:,} that {expected} may have")
        try:
            data = f.read() if limit is None else f.read(limit + 1)
        except OSError as err:
            raise error(f"{path}: cannot read it ({describe_oserror(err)})") from None
    if limit is not None and len(data) > limit:  # the file grew while it was read
        raise error(f"{path}: more than the {limit:,} bytes that {expected} may have")
    return data


def read_small(path, error, limit, expected="a file"):
    """read_regular with a size cap, for files small by nature (configs, JSON, prompts)."""
    return read_regular(path, error, expected, limit)


def read_small_text(path, error, limit, expected="a file"):
    """read_small, decoded as UTF-8; a byte that is not UTF-8 is an error naming its offset."""
    data = read_small(path, error, limit, expected)
    return decode_utf8(data, path, error)


def decode_utf8(data, where, error):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (byte {err.start} is {data[err.start]:#04x})") from None


def parse_json(text, where, error):
    """json.loads(text), every failure (syntax, nesting too deep for Python, bad UTF-8) as `error`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise error(f"{where}: the JSON is nested too deeply to read") from None


def lines_of(text):
    """The lines of a text, split at "\\n" only (and a "\\r" before it dropped).

    str.splitlines also splits at U+2028, U+0085 and other characters that JSON
    strings may hold unescaped, which would cut a valid JSON line in two.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]
