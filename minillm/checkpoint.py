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

import dataclasses
import json
import math
import os
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy

from minillm import backend, files, finetune, hf, memory, system, tokenizers
from minillm.errors import CheckpointError, ConfigError
from minillm.model import GPT, GPTConfig

FORMAT = "minillm-checkpoint"
VERSION = 1
LOCK_FILE = ".lock"


def current_umask():
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


# Read once, at import: os.umask is process-wide, and reading it later, while other threads
# create files, could let one of them see the temporary value.
UMASK = current_umask()


def atomic_write(path, write):
    """Call write(file_object) on a temporary file, then rename it to `path`.

    The file gets the permissions any new file gets (0666 less the umask): mkstemp makes its
    temporary file private (0600), which the renamed file would otherwise keep. An OSError
    names `path`, since the temporary file's name means nothing to a user.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            system.set_mode(f.fileno(), 0o666 & ~UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
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


def remove_unfinished_writes(directory, names):
    """Delete the temporary files that a killed process's atomic_write of these file names left in directory.

    Only a run holding the directory's lock may call this: no write of another run
    can then be in flight.
    """
    for name in names:
        for leftover in Path(directory).glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


@contextmanager
def exclusive(directory):
    """Hold DIRECTORY/.lock while the block runs: a second run on the same folder fails at once.

    The lock is an operating-system file lock (see minillm.system.lock), which the
    system releases when its process ends in any way, kill -9 included, so a lock
    file left by a killed run never blocks the next one; a run that ends normally
    deletes it. The file is never opened through a symbolic link (whose target it
    would overwrite). Where the system has no file locks there is no lock.
    """
    path = Path(directory) / LOCK_FILE
    link_error = CheckpointError(f"the lock file {path} is a symbolic link; remove it, or choose another --out-dir")
    while True:
        if not system.NOFOLLOW and path.is_symlink():  # the open below would follow it
            raise link_error
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | system.NOFOLLOW, 0o666)
        except OSError as err:
            if path.is_symlink():
                raise link_error from None
            raise CheckpointError(f"the lock file {path} cannot be written ({err.strerror}), "
                                  "or choose another --out-dir") from None
        lock = os.fdopen(fd, "r+")
        try:
            if not system.lock(fd):
                break
        except BlockingIOError:
            holder = lock.read().strip()
            lock.close()
            raise in_use(directory, holder) from None
        # A run that ended between our open and our lock deleted the file we locked:
        # then lock the file now at that path instead.
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is not None and os.path.samestat(os.fstat(fd), now):
            break
        lock.close()
        if now is not None and stat.S_ISLNK(now.st_mode):  # put there after the check above, without NOFOLLOW
            raise link_error
    with lock:
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            system.remove_locked(path, lock)


def in_use(directory, holder):
    """The error of a run refused because another one holds the out dir."""
    return CheckpointError(f"the out dir {directory} is in use by another training run "
                           f"(process {holder or 'unknown'}); wait for it to finish or choose another --out-dir")


def lock_holder(directory):
    """The process id (text) of another run that holds DIRECTORY/.lock, "" when it names none; None when unlocked."""
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY | system.NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as lock:
        try:
            system.lock(fd)  # released when the file closes
        except BlockingIOError:
            return lock.read().strip()
        except OSError:
            return None
    return None


# What a damaged zip can raise: BadZipFile (bad structure or checksum), NotImplementedError
# (a flipped bit that asks for an unknown compression), RuntimeError (one that asks for a
# password), zlib.error (an OSError), ValueError (a bad .npy header), EOFError (cut short).
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError)
META = "meta.json"
META_LIMIT = 64 * files.MiB  # a BPE tokenizer of 50,000 tokens takes about 2 MiB
MEMBER_FOLDERS = ("params/", "adam_m/", "adam_v/")
NPY_MAGIC = b"\x93NUMPY"


def open_archive(path):
    """The checkpoint's zip, opened only after checking that it is a regular file holding a zip
    whose member names are all different (zipfile would silently take the last of two)."""
    f = files.open_regular(path, CheckpointError, "a checkpoint file (.npz), such as out/ckpt.npz")
    try:
        if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
            raise CheckpointError(f"{path}: a single NumPy array (.npy), not a minillm checkpoint (.npz)")
        f.seek(0)
        archive = zipfile.ZipFile(f)
    except CheckpointError:
        f.close()
        raise
    except UNREADABLE as err:
        f.close()
        raise unreadable(path, err) from None
    names = [info.filename for info in archive.infolist()]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        archive.close()
        raise CheckpointError(f"{path}: not a valid checkpoint (the member {twice} appears twice)")
    return archive


def unreadable(path, err):
    # NumPy took any file that is neither .npz nor .npy for a pickle; zipfile says "not a zip file".
    why = "it is not a NumPy .npz archive" if isinstance(err, zipfile.BadZipFile) and "zip file" in str(err) else err
    return CheckpointError(f"{path}: not a readable minillm checkpoint ({why})")


def read_member(archive, path, name, shape=None, dtype=None, limit=None):
    """The array stored as NAME.npy, or None when there is none.

    The .npy header (dtype, shape) is read and checked first, against the expected
    shape and dtype, the `limit` in bytes, and the size the zip declares for the
    member; only then are the numbers inflated, straight into the array.
    """
    try:
        info = archive.getinfo(name + ".npy")
    except KeyError:
        return None
    try:
        with archive.open(info) as stream:
            version = numpy.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"{name}: .npy format version {version}")
            header = (numpy.lib.format.read_array_header_1_0 if version == (1, 0)
                      else numpy.lib.format.read_array_header_2_0)
            stored_shape, fortran_order, stored_dtype = header(stream)
            problem = member_problem(stored_shape, stored_dtype, shape, dtype, limit)
            if problem:
                raise CheckpointError(f"{path}: {name} {problem}")
            nbytes = math.prod(stored_shape) * stored_dtype.itemsize
            if info.file_size != stream.tell() + nbytes:
                raise ValueError(f"{name}: the zip declares {info.file_size} bytes, "
                                 f"the .npy header {stream.tell() + nbytes}")
            array = numpy.empty(stored_shape, stored_dtype, order="F" if fortran_order else "C")
            view = memoryview(array.reshape(-1, order="A").view(numpy.uint8)) if nbytes else b""
            got = 0
            while got < nbytes:
                n = stream.readinto(view[got:])
                if not n:
                    raise EOFError(f"{name} is cut short")
                got += n
            return array
    except CheckpointError:
        raise
    except UNREADABLE as err:
        raise unreadable(path, err) from None


def member_problem(stored_shape, stored_dtype, shape, dtype, limit):
    """What is wrong with a member's declared shape and dtype, or None."""
    if stored_dtype.kind not in "fiu" or stored_dtype.fields is not None or stored_dtype.subdtype is not None:
        return f"is stored as {stored_dtype}, not as numbers"
    if dtype is not None and stored_dtype != dtype:
        return f"is stored as {stored_dtype}, where the checkpoint's dtype is {numpy.dtype(dtype)}"
    if shape is not None and tuple(stored_shape) != tuple(shape):
        return f"has the shape {tuple(stored_shape)}, where the model's is {tuple(shape)}"
    if limit is not None and math.prod(stored_shape) * stored_dtype.itemsize > limit:
        return (f"declares {math.prod(stored_shape) * stored_dtype.itemsize:,} bytes, "
                f"more than the {limit:,} it may have")
    return None


def parse_meta(archive, path):
    """The checkpoint's meta.json as a dict, checked to be a minillm checkpoint's."""
    raw = read_member(archive, path, META, dtype=numpy.uint8, limit=META_LIMIT)
    if raw is None or raw.ndim != 1:
        raise CheckpointError(f"{path}: not a minillm checkpoint (no valid meta.json)")
    meta = files.parse_json(files.decode_utf8(raw.tobytes(), f"{path}: meta.json", CheckpointError),
                            f"{path}: meta.json", CheckpointError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: not a minillm checkpoint (format {found!r})")
    return meta


def read_arrays(path, meta_only=False):
    """All arrays of a checkpoint file as host NumPy arrays (none with meta_only), plus its parsed meta.json."""
    with open_archive(path) as archive:
        meta = parse_meta(archive, path)
        names = [] if meta_only else [
            info.filename.removesuffix(".npy") for info in archive.infolist() if info.filename != META + ".npy"
        ]
        limit = memory.physical_memory()
        arrays = {name: read_member(archive, path, name, limit=limit) for name in names}
    if any(array is None for array in arrays.values()):
        raise CheckpointError(f"{path}: a member is not a .npy array")
    return arrays, meta


def read_meta(path):
    """Only the JSON header of a checkpoint (the arrays stay on disk).

    A checkpoint missing from a folder that another run holds (a --resume into it) is that run's to write:
    the error says the folder is in use."""
    try:
        return read_arrays(path, meta_only=True)[1]
    except CheckpointError:
        holder = lock_holder(Path(path).parent) if not Path(path).exists() else None
        if holder is not None:
            raise in_use(Path(path).parent, holder) from None
        raise


def model_from_meta(meta, path, device):
    """(a model of the checkpoint's shape and dtype, its tokenizer), every field of meta.json checked first."""
    where = f"{path}: meta.json"
    try:
        config = meta["config"]
        if not isinstance(config, dict):
            raise ConfigError(f"config must be an object, got {config!r}")
        check_config_keys(config, where)
        config = GPTConfig(**config)
        if meta["dtype"] not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {meta['dtype']!r}")
        tokenizer = tokenizers.from_dict(meta["tokenizer"])
        if not tokenizers.fits(tokenizer, config.vocab_size):
            raise ConfigError(
                f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}"
            )
        model = GPT(config, dtype=meta["dtype"], device=device)
    except KeyError as err:
        raise CheckpointError(f"{where}: the field {err.args[0]!r} is missing") from None
    except TypeError as err:
        raise CheckpointError(f"{where}: invalid config ({err})") from None
    except ValueError as err:  # ConfigError, TokenizerError
        raise CheckpointError(f"{where}: {err}") from None
    return model, tokenizer


def check_config_keys(config, where):
    """Refuse a config key GPTConfig does not have, or a required one it lacks, by name: a file of
    another version of minillm, or of another program, not a config to guess at."""
    fields = dataclasses.fields(GPTConfig)
    known = {field.name for field in fields}
    unknown = [key for key in config if key not in known]
    if unknown:
        raise CheckpointError(
            f"{where}: the config has the key {unknown[0]!r}, which this version of minillm does not know; "
            "the checkpoint comes from another version of minillm or another program: load it with that one"
        )
    required = [field.name for field in fields
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(
            f"{where}: the config lacks the key {missing[0]!r} (it needs {', '.join(required)}); "
            "the checkpoint comes from another version of minillm or another program, or is damaged"
        )


def check_finite(array, path, what):
    """Refuse a NaN or an infinity: training never saves a non-finite step, so such numbers mean a
    damaged file or one written elsewhere, and a model built from them samples garbage."""
    if not numpy.isfinite(array).all():
        kind = "a NaN" if numpy.isnan(array).any() else "an infinity"
        raise CheckpointError(
            f"{path}: {what} holds {kind}, which no minillm run saves; the file is damaged or was not written "
            "by minillm's training: use another checkpoint"
        )


def check_member_names(archive, path, model, has_optimizer):
    """A name under params/, adam_m/ or adam_v/ that is not one of this model's parameters is damage
    (a central directory entry that no longer matches its file), not something to skip; members
    outside those folders are left unread."""
    names = [info.filename.removesuffix(".npy") for info in archive.infolist()]
    ours = [name for name in names if name.startswith(MEMBER_FOLDERS)]
    unknown = [name for name in ours if name.split("/", 1)[1] not in model.params]
    if unknown:
        raise CheckpointError(f"{path}: the member {unknown[0]!r} is no parameter of this model")
    moments = {kind: {name.split("/", 1)[1] for name in ours if name.startswith(kind)}
               for kind in ("adam_m/", "adam_v/")}
    if moments["adam_m/"] != moments["adam_v/"] or (moments["adam_m/"] and not has_optimizer):
        raise CheckpointError(f"{path}: the optimizer moments adam_m and adam_v do not match")


def count(meta, name, path):
    """meta[name], checked to be a whole number of 0 or more."""
    value = meta[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{path}: meta.json: {name} must be a whole number of 0 or more, got {value!r}")
    return value


def load(path, device="cpu"):
    """(model, tokenizer, meta, optimizer_state or None) from a checkpoint file.

    Only the members the model needs are read, each checked against the model's
    shapes and dtype before it is inflated (see read_member).
    """
    with open_archive(path) as archive:
        meta = parse_meta(archive, path)
        model, tokenizer = model_from_meta(meta, path, device)
        check_member_names(archive, path, model, "optimizer_step" in meta)
        for name, p in model.params.items():
            stored = read_member(archive, path, f"params/{name}", p.shape, model.dtype)
            if stored is None:
                raise CheckpointError(f"{path}: parameter {name} is missing")
            check_finite(stored, path, f"parameter {name}")
            p[...] = backend.to_device(stored, model.device)
        for name in ("step", "evals_since_best"):
            if name in meta:
                count(meta, name, path)
        optimizer_state = None
        if "optimizer_step" in meta:
            count(meta, "optimizer_step", path)
            names = [
                info.filename.removeprefix("adam_m/").removesuffix(".npy")
                for info in archive.infolist() if info.filename.startswith("adam_m/")
            ]
            unknown = [name for name in names if name not in model.params]
            if unknown:
                raise CheckpointError(f"{path}: optimizer state for {unknown[0]}, which the model does not have")
            optimizer_state = {"t": meta["optimizer_step"], "m": {}, "v": {}}
            for name in names:
                p = model.params[name]
                for kind in ("m", "v"):
                    moment = read_member(archive, path, f"adam_{kind}/{name}", p.shape, model.dtype)
                    if moment is None:
                        raise CheckpointError(f"{path}: the optimizer moment adam_{kind}/{name} is missing")
                    check_finite(moment, path, f"the optimizer moment adam_{kind}/{name}")
                    optimizer_state[kind][name] = moment
    return model, tokenizer, meta, optimizer_state


def load_merged(path, device, other_ways):
    """(model, tokenizer) of a checkpoint file, its LoRA adapters merged: the same logits, without
    forming the adapted weights at every token, for sampling and looking inside.

    A path that does not exist is named with how to get a checkpoint (`other_ways`: the
    command's other options that name a model); anything else there is the reader's to describe.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: no such checkpoint file; train one with `python train.py`, "
                              f"or pass {other_ways}")
    model, tokenizer, _, _ = load(path, device=device)
    return finetune.merged(model), tokenizer


def load_pretrained(path, device="cpu", dtype="float32"):
    """(model, tokenizer) from a minillm checkpoint file, a minillm out dir (its best checkpoint, ckpt.npz)
    or a Hugging Face GPT-2 directory.

    `dtype` applies to GPT-2 directories; a checkpoint keeps the dtype it was saved with.
    """
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").exists():
        if not (folder / "ckpt.npz").is_file():
            raise hf.PretrainedError(f"{path}: neither a GPT-2 directory (no config.json) nor a minillm out dir "
                                     "(no ckpt.npz): give a checkpoint file, an out dir or a GPT-2 directory")
        path = folder / "ckpt.npz"  # a run's out dir, as train.py leaves it
    if Path(path).is_dir():
        model, tokenizer = hf.from_pretrained(path, dtype=dtype, device=device)
        if tokenizer is None:
            raise hf.PretrainedError(f"{path}: no vocab.json and merges.txt, so no tokenizer to encode text with")
        return model, tokenizer
    model, tokenizer, _, _ = load(path, device=device)
    return model, tokenizer
