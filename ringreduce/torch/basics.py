"""Horovod's introspection names: init, sizes and ranks, what is built, the error type.

``init(comm=...)`` takes what Horovod's takes: nothing (MPI.COMM_WORLD), an
mpi4py communicator, or a list of world ranks; and ``process_sets=`` (a list
of process sets to register, or ``"dynamic"``). ``cross_rank()`` /
``cross_size()`` follow Horovod: the ranks that share this rank's local rank,
one per node; they are learned with one small collective inside ``init()``
(or at the first call, which every rank must then make).

Example
-------
>>> import ringreduce.torch as hvd
>>> hvd.init()
>>> hvd.is_initialized(), hvd.size(), hvd.cross_size(), hvd.nccl_built()
(True, 4, 1, False)
"""

from __future__ import annotations

import logging

import ringreduce as rr

from .mpi_ops import HANDLES

__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank",
    "cross_size", "cross_rank", "is_homogeneous", "mpi_threads_supported", "mpi_enabled",
    "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built", "ccl_built",
    "cuda_built", "rocm_built", "start_timeline", "stop_timeline", "HorovodInternalError",
]

log = logging.getLogger(__name__)

HorovodInternalError = rr.RingReduceError
size, rank, local_size, local_rank = rr.size, rr.rank, rr.local_size, rr.local_rank
is_initialized = rr.is_initialized


class _Cross:
    """Per-init cache of (local_rank, local_size) of every rank, for cross_* and is_homogeneous."""

    def __init__(self):
        self.table = None

    def get(self):
        if self.table is None:
            self.table = rr.allgather_object((rr.local_rank(), rr.local_size()))
        return self.table


_CROSS = _Cross()


def _comm_of(comm):
    """Horovod's ``init(comm=[ranks])``: a communicator over those world ranks."""
    if comm is None or not isinstance(comm, (list, tuple, range)):
        return comm
    from mpi4py import MPI

    ranks = sorted({int(r) for r in comm})
    world = MPI.COMM_WORLD
    if world.Get_rank() not in ranks:
        raise ValueError(f"rank {world.Get_rank()}: init(comm={ranks}) called on a rank that is "
                         "not in the list")
    group = world.Get_group().Incl(ranks)
    sub = world.Create_group(group)   # collective over the listed ranks only
    group.Free()
    return sub


def init(comm=None, process_sets=None) -> None:
    """Start ringreduce (idempotent), like Horovod's ``hvd.init``.

    Parameters
    ----------
    comm : None, an mpi4py communicator, or a list of MPI.COMM_WORLD ranks
    process_sets : list of ``ProcessSet``, ``"dynamic"`` or None
        Process sets to register now (every rank passes the same list).
    """
    rr.init(_comm_of(comm))
    HANDLES.clear()
    _CROSS.table = None
    _CROSS.get()
    if process_sets is not None and process_sets != "dynamic":
        for ps in process_sets:
            rr.add_process_set(ps)


def shutdown() -> None:
    """Stop ringreduce's background work (Horovod's ``hvd.shutdown``); pending handles are dropped."""
    HANDLES.clear()
    _CROSS.table = None
    rr.shutdown()


def cross_rank() -> int:
    """This rank's index among the ranks with the same local rank (its node's index)."""
    me, lr = rr.rank(), rr.local_rank()
    return sum(1 for r, (l, _) in enumerate(_CROSS.get()) if l == lr and r < me)


def cross_size() -> int:
    """How many ranks share this rank's local rank (the number of nodes, when homogeneous)."""
    lr = rr.local_rank()
    return sum(1 for l, _ in _CROSS.get() if l == lr)


def is_homogeneous() -> bool:
    """True when every node runs the same number of ranks."""
    return len({s for _, s in _CROSS.get()}) == 1


def mpi_threads_supported() -> bool:
    """True when MPI gave MPI_THREAD_MULTIPLE (the engine thread then overlaps communication)."""
    return rr.info()["thread_level"] == "multiple"


def mpi_enabled() -> bool:
    """Always True: ringreduce runs on MPI (through mpi4py)."""
    return True


def mpi_built() -> bool:
    """Always True: ringreduce runs on MPI (through mpi4py)."""
    return True


def gloo_enabled() -> bool:
    """False: ringreduce has no Gloo controller (it needs an MPI launch)."""
    return False


def gloo_built() -> bool:
    """False: ringreduce has no Gloo controller (it needs an MPI launch)."""
    return False


def nccl_built() -> bool:
    """False: ringreduce does not use NCCL; CUDA tensors go through its own ring over MPI.

    (Horovod returns NCCL's version number here; code testing ``if hvd.nccl_built():``
    takes the non-NCCL path, which is the right one.)
    """
    return False


def ddl_built() -> bool:
    """False: no IBM DDL."""
    return False


def ccl_built() -> bool:
    """False: no oneCCL."""
    return False


def cuda_built() -> bool:
    """True when ringreduce's CUDA kernels were built (ringreduce._C_cuda)."""
    try:
        return bool(rr.info()["extensions"]["cuda"])
    except Exception:  # engine not initialised: say what the build has without starting it
        return False


def rocm_built() -> bool:
    """False: no ROCm build."""
    return False


def start_timeline(file_path, mark_cycles=False) -> None:
    """Accepted for Horovod scripts; ringreduce's timeline is chosen at launch, not here.

    Set ``RINGREDUCE_TIMELINE=path`` (``{rank}`` in the path for a file per
    rank) before starting the job; this call only logs a warning.
    """
    log.warning("start_timeline(%r): ringreduce writes its timeline when RINGREDUCE_TIMELINE is "
                "set at launch; this call does nothing", file_path)


def stop_timeline() -> None:
    """Accepted for Horovod scripts; does nothing (see :func:`start_timeline`)."""
