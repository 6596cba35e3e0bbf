"""Checkpoints: one NumPy .npz file, loaded without pickle, written atomically.

Layout inside the .npz (a zip of .npy arrays):
    meta.json           UTF-8 JSON as a uint8 array: format, config, dtype, tokenizer, step, ...
    params/NAME         every model parameter
    adam_m/NAME         AdamW first moments   (when an optimizer is saved; trainable parameters only)
    adam_v/NAME         AdamW second moments

Loading uses numpy.load(allow_pickle=False), so a file can hold only plain
numeric arrays: opening a checkpoint never executes code. Saving writes a
temporary file beside the target, flushes it to disk, then renames it over the
target, so an interrupted save leaves the previous checkpoint intact.
"""

import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy

from minillm import backend, tokenizers
from minillm.model import GPT, GPTConfig

FORMAT = "minillm-checkpoint"
VERSION = 1
LOCK_FILE = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written."""


def atomic_write(path, write):
    """Call write(file_object) on a temporary file, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(path, model, tokenizer, optimizer=None, optimizer_state=None, **meta):
    """Write model parameters (and optimizer moments) to `path`; extra keyword values go into meta.json.

    optimizer_state: an optimizer's state_dict() already taken, in place of the optimizer.
    """
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "dtype": model.dtype.name,
        "tokenizer": tokenizer.to_dict(),
        **meta,
    }
    arrays = {f"params/{name}": backend.to_host(p) for name, p in model.params.items()}
    state = optimizer.state_dict() if optimizer is not None else optimizer_state
    if state is not None:
        header["optimizer_step"] = state["t"]
        for name in state["m"]:
            arrays[f"adam_m/{name}"] = backend.to_host(state["m"][name])
            arrays[f"adam_v/{name}"] = backend.to_host(state["v"][name])
    arrays["meta.json"] = numpy.frombuffer(json.dumps(header).encode("utf-8"), dtype=numpy.uint8)
    try:
        atomic_write(path, lambda f: numpy.savez(f, **arrays))
    except OSError as err:
        kept = f"the previous {Path(path).name} is unchanged" if Path(path).exists() else "nothing was written"
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; {kept}") from None


def remove_unfinished_writes(directory):
    """Delete the temporary files of writes that a killed process left behind in directory.

    Only a run holding the directory's lock may call this: no write of another run
    can then be in flight.
    """
    for leftover in Path(directory).glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


@contextmanager
def exclusive(directory):
    """Hold DIRECTORY/.lock while the block runs: a second run on the same folder fails at once.

    The lock is an operating-system file lock (flock), which the system releases
    when its process ends in any way, kill -9 included, so a lock file left by a
    killed run never blocks the next one; a run that ends normally deletes it.
    The file is never opened through a symbolic link (whose target it would
    overwrite). Where flock does not exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(directory) / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            what = "is a symbolic link; remove it" if path.is_symlink() else f"cannot be written ({err.strerror})"
            raise CheckpointError(f"the lock file {path} {what}, or choose another --out-dir") from None
        lock = os.fdopen(fd, "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip()
            lock.close()
            raise CheckpointError(
                f"the out dir {directory} is in use by another training run (process {holder or 'unknown'}); "
                "wait for it to finish or choose another --out-dir"
            ) from None
        # A run that ended between our open and our flock deleted the file we locked:
        # then lock the file now at that path instead.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                break
        except FileNotFoundError:
            pass
        lock.close()
    with lock:
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: no other run holds this file


def read_arrays(path, meta_only=False):
    """All arrays of a checkpoint file as host NumPy arrays (none with meta_only), plus its parsed meta.json."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            names = [name for name in npz.files if name == "meta.json" or not meta_only]
            arrays = {name: npz[name] for name in names}
    # What a damaged zip can raise: BadZipFile (bad structure or checksum), NotImplementedError
    # (a flipped bit that asks for an unknown compression), RuntimeError (one that asks for a
    # password), zlib.error (an OSError), ValueError (a bad .npy header), EOFError (cut short).
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as err:
        # NumPy takes any file that is neither .npz nor .npy for a pickle, which it refuses to open.
        why = "it is not a NumPy .npz archive" if "pickled" in str(err) else err
        raise CheckpointError(f"{path}: not a readable minillm checkpoint ({why})") from None
    try:
        meta = json.loads(arrays.pop("meta.json").tobytes().decode("utf-8"))
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: not a minillm checkpoint (no valid meta.json)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a minillm checkpoint (format {meta.get('format')!r})")
    return arrays, meta


def read_meta(path):
    """Only the JSON header of a checkpoint (the arrays stay on disk)."""
    return read_arrays(path, meta_only=True)[1]


def load(path, device="cpu"):
    """(model, tokenizer, meta, optimizer_state or None) from a checkpoint file."""
    arrays, meta = read_arrays(path)
    try:
        config = GPTConfig(**meta["config"])
        tokenizer = tokenizers.from_dict(meta["tokenizer"])
        model = GPT(config, dtype=meta["dtype"], device=device)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid checkpoint metadata ({err})") from None
    for name, p in model.params.items():
        stored = arrays.get(f"params/{name}")
        if stored is None or stored.shape != p.shape:
            raise CheckpointError(f"{path}: parameter {name} is missing or has the wrong shape")
        p[...] = backend.to_device(stored, model.device)
    optimizer_state = None
    if "optimizer_step" in meta:
        names = [name.removeprefix("adam_m/") for name in arrays if name.startswith("adam_m/")]
        optimizer_state = {
            "t": meta["optimizer_step"],
            "m": {name: arrays[f"adam_m/{name}"] for name in names},
            "v": {name: arrays.get(f"adam_v/{name}") for name in names},
        }
    return model, tokenizer, meta, optimizer_state


def load_pretrained(path, device="cpu", dtype="float32"):
    """(model, tokenizer) from a minillm checkpoint file or a Hugging Face GPT-2 directory.

    `dtype` applies to GPT-2 directories; a checkpoint keeps the dtype it was saved with.
    """
    if Path(path).is_dir():
        from minillm import hf  # hf imports the model, as this module does: import it when needed

        model, tokenizer = hf.from_pretrained(path, dtype=dtype, device=device)
        if tokenizer is None:
            raise hf.PretrainedError(f"{path}: no vocab.json and merges.txt, so no tokenizer to encode text with")
        return model, tokenizer
    model, tokenizer, _, _ = load(path, device=device)
    return model, tokenizer
