"""Process sets (Horovod's name): a group of ranks with its own communicator.

A collective with ``process_set=ps`` runs on the ranks of ps only, exactly as
with ``comm=ps.comm``: the two are spellings of one thing. ``rr.add_process_set``
is collective over the init communicator (every rank calls it, members or not),
like Horovod's.

Example::

    evens = rr.add_process_set(rr.ProcessSet(range(0, rr.size(), 2)))
    if evens.included():
        y = rr.allreduce(x, process_set=evens)
    rr.remove_process_set(evens)
"""
from __future__ import annotations

from ..core.errors import RingReduceError
from ..core.mpi import MPI
from . import context as _context

__all__ = ["ProcessSet", "add_process_set", "remove_process_set", "global_process_set", "resolve_comm"]


class ProcessSet:
    """A set of ranks of the init communicator, or an existing mpi4py communicator.

    Parameters
    ----------
    ranks_or_comm : iterable of ranks (of the init communicator), or an mpi4py
        communicator (then its ranks are the set; it must be one every member holds).
    """

    def __init__(self, ranks_or_comm=None):
        self.comm = None          # this rank's communicator over the set (None: not a member)
        self._given = None
        self._global = ranks_or_comm is None
        if ranks_or_comm is None:
            self.ranks = None
        elif isinstance(ranks_or_comm, MPI.Comm):
            self._given = ranks_or_comm
            self.ranks = None
        else:
            ranks = sorted({int(r) for r in ranks_or_comm})
            if not ranks:
                raise RingReduceError("a process set needs at least one rank")
            self.ranks = ranks
        self.registered = self._global

    def _world(self):
        return _context.context()

    def included(self) -> bool:
        """Whether this rank belongs to the set."""
        if self._global:
            return True
        return self.comm is not None and self.comm != MPI.COMM_NULL

    def size(self) -> int:
        return self._world().size if self._global else len(self.ranks or [])

    def rank(self) -> int:
        """This rank's rank in the set (-1 when not a member)."""
        if self._global:
            return self._world().rank
        return self.comm.Get_rank() if self.included() else -1

    def __repr__(self) -> str:
        return "ProcessSet(global)" if self._global else f"ProcessSet(ranks={self.ranks})"


global_process_set = ProcessSet()


def add_process_set(ps) -> ProcessSet:
    """Register a process set (collective over the init communicator); returns it.

    Accepts a ProcessSet, a list of ranks or an mpi4py communicator.
    """
    if not isinstance(ps, ProcessSet):
        ps = ProcessSet(ps)
    if ps.registered:
        return ps
    world = _context.context()
    if ps._given is not None:
        comm = ps._given
        # Its ranks in the init communicator's numbering (every rank learns them).
        group, wgroup = comm.Get_group(), world.user_comm.Get_group()
        mine = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), wgroup)
        group.Free()
        wgroup.Free()
        ps.ranks = sorted(int(r) for r in mine)
        ps.comm = comm
    else:
        bad = [r for r in ps.ranks if not 0 <= r < world.size]
        if bad:
            raise RingReduceError(f"rank {world.rank}: process set ranks {bad} are out of range for "
                                  f"{world.size} ranks")
        wgroup = world.user_comm.Get_group()
        group = wgroup.Incl(ps.ranks)
        ps.comm = world.user_comm.Create(group)   # collective over the init communicator
        group.Free()
        wgroup.Free()
        if ps.comm == MPI.COMM_NULL:
            ps.comm = None
    ps.registered = True
    return ps


def remove_process_set(ps: ProcessSet) -> bool:
    """Forget a process set and free its communicator (collective over the set's members)."""
    if ps is global_process_set or ps._global:
        raise RingReduceError("the global process set cannot be removed")
    if not ps.registered:
        return False
    if ps.comm is not None and ps._given is None and not MPI.Is_finalized():
        ps.comm.Free()                           # the context on it goes with it
    ps.comm = None
    ps.registered = False
    return True


def resolve_comm(comm, process_set, who: str = "this rank"):
    """The communicator a collective runs on, from `comm=` or `process_set=` (not both differently)."""
    if process_set is None or process_set is global_process_set or getattr(process_set, "_global", False):
        return comm
    if not isinstance(process_set, ProcessSet):
        raise RingReduceError(f"{who}: process_set must be an rr.ProcessSet, got {type(process_set).__name__}")
    if not process_set.registered:
        raise RingReduceError(f"{who}: {process_set!r} is not registered; call rr.add_process_set first")
    if not process_set.included():
        raise RingReduceError(f"{who}: not a member of {process_set!r}")
    if comm is not None and comm is not process_set.comm:
        raise RingReduceError(f"{who}: both comm= and process_set= given, and they differ")
    return process_set.comm
