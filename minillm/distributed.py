"""Data parallelism over MPI: one training run on several processes, on one machine or many.

`mpiexec -n N python train.py ...` starts N copies of train.py, the ranks 0 to N-1. Each
holds the whole model, draws its own rows of every batch and computes their gradients,
then the ranks sum their weighted gradients and all take the same AdamW step, so their
parameters stay identical. Only rank 0 prints and writes (logs, checkpoints, samples).

--batch-size stays the whole batch: rank r draws its share of the rows (numpy.array_split
sizes) from its own generator, seeded with (seed, step, r). Within each micro-batch the
ranks weigh their gradients exactly as ShardedGPT weighs its threads' (minillm/parallel.py):
with n_r counted targets on rank r and n in the micro-batch,

    grads = sum over r of (n_r / n) * grads_r

so N ranks give the gradient of one process that takes the whole micro-batch (up to
rounding). Per optimizer step the ranks exchange
    before the step, whether any of them was asked to stop (Ctrl-C), so all stop together;
    before the first forward pass, the counted targets of each micro-batch (a few numbers);
    after the last backward pass, the gradients and the loss: ONE allreduce of one flat
        buffer (with --zero 1, train_step's ranks are a zero.ZeroRanks instead: a reduce-scatter,
        then the loss and the squared gradient norm as one number each, and an allgather of
        the parameters; see minillm/zero.py).
With --grad-accum the gradients of the micro-batches are added up on each rank first.
The exchange starts after the last backward pass: it does not overlap with it.

Failures: an error that every rank meets alike (a bad option, a non-finite step, which
every rank sees in the same summed numbers) is reported by one rank and every rank exits;
an error in the setup of one rank only is shared (stop_all_if_any_fails()), so the others stop too; any
other error on one rank aborts the whole job (MPI_Abort), so no rank waits forever.

Nothing here imports mpi4py unless an MPI launcher started this process (see launched_rank).
"""

import os
import sys
import time

import numpy

from minillm import backend
from minillm.errors import ConfigError
from minillm.layers.cross_entropy import IGNORE_INDEX

ABORT_DELAY_S = 1.0

# Set by the launchers: MPICH's and Intel MPI's hydra, Open MPI's mpirun, PMIx launchers (srun among them).
LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


class DistributedError(ConfigError):
    """A launch that cannot work: MPI missing, a batch that cannot be split, too few GPUs (a usage error)."""


class RankStopped(Exception):
    """Another rank failed and reported why; this one stops quietly."""


def launched_rank():
    """This process's rank as an MPI launcher set it, or None when no launcher started it."""
    for name in LAUNCHER_RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


class World:
    """This process among the ranks of one job; World() with no communicator is a process alone.

    comm is an mpi4py communicator. Arrays are summed in place, on the host through MPI,
    on a GPU through NCCL when CuPy has it (else through the host).
    """

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm else 0
        self.size = comm.Get_size() if comm else 1
        self.local_rank, self.local_size = self.rank, self.size
        if comm:
            from mpi4py import MPI

            local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            local.Free()
        self.nccl = None
        self._flat_layout = None  # where each gradient lives in the flat buffer of the allreduce

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def stream_keys(self):
        """What a rank adds to the (seed, stream, step) of its random draws: its rank, with several.

        A process alone (under mpiexec -n 1 too) draws exactly what a plain run draws.
        """
        return (self.rank,) if self.size > 1 else ()

    def rows(self, batch_size):
        """How many of the batch's rows this rank takes (the first ranks take one more when uneven)."""
        if batch_size < self.size:
            raise DistributedError(
                f"--batch-size {batch_size} cannot be split across {self.size} processes: give each at least "
                f"one row (--batch-size {self.size} or more) or start fewer processes"
            )
        return batch_size // self.size + (self.rank < batch_size % self.size)

    def cores(self, usable):
        """CPU cores for this rank: the machine's usable cores shared among its ranks (at least one)."""
        return max(1, usable // self.local_size)

    def take_gpu(self):
        """Make this rank's GPU (its rank on this machine) CuPy's current device, before any array is made."""
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if self.local_size > count:
            raise DistributedError(
                f"{self.local_size} processes on this machine share {count} GPU(s): start at most {count} "
                "per machine (each takes one GPU), or train on the CPU with --device cpu"
            )
        cupy.cuda.Device(self.local_rank).use()

    def connect_gpus(self):
        """Set up NCCL among the ranks (every rank must call this), when CuPy has it; else sums go through the host."""
        if self.comm is None:
            return
        try:
            from cupy.cuda import nccl
        except ImportError:
            return
        if not getattr(nccl, "available", True):
            return
        # NCCL's id is 128 bytes; it travels as plain integers (no pickle).
        unique_id = numpy.array(nccl.get_unique_id() if self.is_main else [0] * 128, dtype=numpy.int64)
        self.comm.Bcast(unique_id, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, tuple(int(b) for b in unique_id), self.rank)

    @property
    def gradient_path(self):
        """How arrays are summed: "nccl", "mpi" or "alone"."""
        return "nccl" if self.nccl else "mpi" if self.comm else "alone"

    # Collectives. Each array must be contiguous; host arrays go to MPI as they are.

    def allreduce(self, array):
        """Sum `array` over the ranks, in place; returns it."""
        if self.comm is None:
            return array
        if self._on_device(array):
            if self.nccl:
                self.nccl.allReduce(array.data.ptr, array.data.ptr, array.size, _nccl_type(array), _nccl_sum(),
                                    _stream())
                return array
            array[...] = backend.to_device(self.allreduce(backend.to_host(array).copy()), "cuda")
            return array
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        return array

    def reduce_scatter(self, array, shard):
        """shard = this rank's part (the rank-th of `size` equal parts) of `array` summed over the ranks."""
        if self.comm is None:
            shard[...] = array
        elif self._on_device(array) and self.nccl:
            self.nccl.reduceScatter(array.data.ptr, shard.data.ptr, shard.size, _nccl_type(array), _nccl_sum(),
                                    _stream())
        elif self._on_device(array):
            host = numpy.empty(shard.shape, dtype=shard.dtype)
            self.comm.Reduce_scatter_block(backend.to_host(array), host)
            shard[...] = backend.to_device(host, "cuda")
        else:
            self.comm.Reduce_scatter_block(array, shard)
        return shard

    def allgather(self, array):
        """Fill every rank's part of `array` (size equal parts) from that rank, in place; returns it."""
        if self.comm is None:
            return array
        part = array.size // self.size
        if self._on_device(array) and self.nccl:
            mine = array[self.rank * part:(self.rank + 1) * part]
            self.nccl.allGather(mine.data.ptr, array.data.ptr, part, _nccl_type(array), _stream())
        elif self._on_device(array):
            array[...] = backend.to_device(self.allgather(backend.to_host(array).copy()), "cuda")
        else:
            from mpi4py import MPI

            self.comm.Allgather(MPI.IN_PLACE, array)
        return array

    def gather(self, part):
        """Every rank's equal-sized host array `part`, concatenated in rank order on rank 0; None on the others."""
        if self.comm is None:
            return part
        whole = numpy.empty(part.size * self.size, dtype=part.dtype) if self.is_main else None
        self.comm.Gather(numpy.ascontiguousarray(part), whole, root=0)
        return whole

    def any(self, flag):
        """Whether any rank passed True."""
        if self.comm is None:
            return bool(flag)
        return bool(self.allreduce(numpy.array([float(bool(flag))]))[0])

    def _on_device(self, array):
        return backend.get_array_module(array) is not numpy

    # What a training step asks of the ranks (minillm.training.train_step).

    def micro_batch_weights(self, micro_batches):
        """(each micro-batch's weight in this rank's share of the step's loss, the step's tokens on all ranks).

        Alone: 1/grad_accum each. On several ranks, n_r / n / grad_accum, with n_r this rank's
        counted targets in that micro-batch and n those of all ranks: the same weights as
        ShardedGPT's, over the ranks.
        """
        accum = len(micro_batches)
        if self.comm is None:
            return [1.0 / accum] * accum, sum(int(idx.size) for idx, _ in micro_batches)
        counts = [float((targets != IGNORE_INDEX).sum()) for _, targets in micro_batches]
        totals = self.allreduce(numpy.array(counts + [float(sum(idx.size for idx, _ in micro_batches))]))
        weights = [count / max(total, 1.0) / accum for count, total in zip(counts, totals[:-1])]
        return weights, int(totals[-1])

    def sum_gradients(self, loss, grads):
        """(loss, grads) summed over the ranks: one allreduce of one flat buffer that holds both."""
        if self.comm is None:
            return loss, grads
        layout = self._layout(grads)
        flat = layout.buffer
        for name, (start, end) in layout.spans.items():
            flat[start:end] = grads[name].reshape(-1)
        flat[-1] = loss
        self.allreduce(flat)
        return flat[-1].copy(), {name: flat[start:end].reshape(grads[name].shape) for name, (start, end) in
                                 layout.spans.items()}

    def _layout(self, grads):
        layout = self._flat_layout
        if layout is None or list(layout.spans) != list(grads):
            self._flat_layout = layout = FlatLayout(grads, extra=1)
        return layout

    # Each rank holds whole gradients, so their squared norm needs no sum over the ranks (zero.ZeroRanks's does).
    across_shards = None

    def stop_all_if_any_fails(self, work):
        """work(), with the ranks agreeing on the outcome: if it failed on any rank, every rank stops.

        Every failed rank raises its error, marked every_rank (no rank waits: nothing to abort),
        and reported_elsewhere except on the lowest failed rank, which train.py reports; the
        ranks that did not fail raise RankStopped. Without this, ranks whose setup
        succeeded would wait forever at their first exchange for one whose setup failed.
        """
        try:
            result, error = work(), None
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            result, error = None, err
        if self.comm is None:
            if error is not None:
                raise error
            return result
        failed = numpy.array([self.rank if error is not None else self.size], dtype=numpy.float64)
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, failed, op=MPI.MIN)
        first = int(failed[0])
        if first == self.size:
            return result
        if error is None:
            raise RankStopped(f"rank {first} failed")
        error.every_rank, error.reported_elsewhere = True, first != self.rank
        raise error

    def abort(self, code):
        """End every rank of the job at once (MPI_Abort); returns only for a process alone."""
        if self.comm is not None and self.size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            # The launcher ends the job as soon as it hears of the abort, and with it the passing-on of what this
            # rank wrote last (its error): give that a moment first.
            time.sleep(ABORT_DELAY_S)
            self.comm.Abort(code)


class FlatLayout:
    """Where each named array lives in one flat buffer: spans name -> (start, end), then `extra` slots."""

    def __init__(self, arrays, extra=0, parts=1):
        self.spans, offset = {}, 0
        for name, array in arrays.items():
            self.spans[name] = (offset, offset + int(array.size))
            offset += int(array.size)
        self.size = offset
        # parts equal parts (for ZeRO-1's shards), padded with zeros at the end.
        self.part = -(-(offset + extra) // parts)
        xp = backend.get_array_module(*arrays.values())
        first = next(iter(arrays.values()))
        self.buffer = xp.zeros(self.part * parts, dtype=first.dtype)


def _stream():
    import cupy

    return cupy.cuda.get_current_stream().ptr


def _nccl_type(array):
    from cupy.cuda import nccl

    return {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}[array.dtype.name]


def _nccl_sum():
    from cupy.cuda import nccl

    return nccl.NCCL_SUM


SINGLE_PROCESS = World()

_joined = {}


def join():
    """The World of this process: under an MPI launcher, the launched job's (mpi4py imported
    here, and only here); otherwise SINGLE_PROCESS. The same World on every call."""
    if "world" in _joined:
        return _joined["world"]
    if launched_rank() is None:
        world = SINGLE_PROCESS
    else:
        try:
            from mpi4py import MPI
        except ImportError:
            error = DistributedError(
                "this process was started by an MPI launcher (mpiexec), but mpi4py is not installed: "
                "pip install -e \".[mpi]\" (mpi4py and MPICH), or install mpi4py for your cluster's MPI"
            )
            # Every rank fails alike and none can tell the others: rank 0 alone says so.
            error.every_rank, error.reported_elsewhere = True, launched_rank() != 0
            raise error from None
        world = World(MPI.COMM_WORLD)
    _joined["world"] = world
    return world


def joined():
    """The World that join() gave, or None before it (or when it failed)."""
    return _joined.get("world")
