"""torch.distributed on ringreduce: the "ringreduce" process-group backend.

``import ringreduce.torch`` registers the backend, so a DDP or FSDP script moves
onto MPI, our algorithms and our mismatch check by changing one string::

    import ringreduce.torch as rrt
    rrt.init_process_group()             # under mpirun/srun: no MASTER_ADDR, no port
    # or: torch.distributed.init_process_group("ringreduce")   (env:// or tcp:// as usual)
    model = torch.nn.parallel.DistributedDataParallel(model)

Every collective torch routes to a process group runs on the engine thread, in
the order the caller issued them (ranks must issue them in the same order, as
with any backend), and returns a Work whose future completes from that thread;
``async_op=True`` overlaps. Torch's ranks are MPI's ranks: the default group is
the communicator ringreduce was initialised on, ``new_group(ranks)`` is a
sub-communicator of it. Point-to-point (send/recv) posts nonblocking MPI calls
on the group's own duplicate communicator at once, off the engine's queue, so
unmatched collectives never wait behind them.
"""
from __future__ import annotations

import datetime
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import default_pg_timeout

import ringreduce as rr

from ..core.errors import RingReduceError
from ..core.mpi import MPI
from ..runtime import context as _context
from ..runtime.collectives import allreduce_on, broadcast_on
from ..runtime.engine import run_async, run_blocking
from ..runtime.gather import _barrier_on, allgather_on, alltoall_on
from ..runtime.reducescatter import _grouped_on, reducescatter_on
from ._convert import from_array, to_array

__all__ = ["BACKEND", "MIN_TORCH", "ProcessGroupRingReduce", "engine_work", "init_process_group",
           "register"]

BACKEND = "ringreduce"
MIN_TORCH = (2, 13)          # the oldest torch the backend is tested on; older is refused

_OPS = {
    dist.ReduceOp.SUM: rr.Sum,
    dist.ReduceOp.AVG: rr.Average,
    dist.ReduceOp.PRODUCT: rr.Product,
    dist.ReduceOp.MIN: rr.Min,
    dist.ReduceOp.MAX: rr.Max,
}


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _reduction(op, who: str):
    """(ringreduce op, prescale factor) for a torch ReduceOp (PREMUL_SUM is a scaled Sum)."""
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.PREMUL_SUM:
        factor = getattr(op, "factor", None)
        if not isinstance(factor, (int, float)):
            raise RingReduceError(f"{who}: ReduceOp.PREMUL_SUM with a tensor factor is not supported; "
                                  "pass a Python number")
        return rr.Sum, float(factor)
    try:
        return _OPS[kind], 1.0
    except KeyError:
        raise RingReduceError(f"{who}: ReduceOp.{getattr(kind, 'name', kind)} is not supported by the "
                              "ringreduce backend (it reduces with SUM, AVG, PRODUCT, MIN, MAX and "
                              "PREMUL_SUM)") from None


def _array(t: torch.Tensor, who: str, what: str):
    """The engine's view of a tensor: torch's backends refuse non-contiguous tensors, so do we."""
    if not isinstance(t, torch.Tensor):
        raise RingReduceError(f"{who}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise RingReduceError(f"{who}: {what} is not contiguous (shape {tuple(t.shape)}, stride "
                              f"{t.stride()}); call .contiguous() first")
    if t.is_complex():
        t = torch.view_as_real(t)
    return to_array(t)


def _flat(t: torch.Tensor, who: str, what: str):
    return _array(t, who, what).reshape(-1)


def _raw(t: torch.Tensor, who: str, what: str):
    """A tensor's bytes as a flat uint8 array: data movement is dtype-blind (bool, complex...)."""
    _array(t, who, what)                      # the same checks as the reductions
    return to_array(t.detach().reshape(-1).view(torch.uint8))


def _seconds(timeout) -> float | None:
    """A Work.wait(timeout=) as seconds; None when torch passes no bound (timedelta(0))."""
    if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0:
        return timeout.total_seconds()
    return None


def _copy_into(dst: torch.Tensor, src) -> None:
    """Copy an engine result (numpy/cupy, any shape of the same size) into a torch tensor."""
    view = dst if not dst.is_complex() else torch.view_as_real(dst)
    view.reshape(-1).copy_(from_array(src).reshape(-1))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _copy_bytes(dst: torch.Tensor, src) -> None:
    """Copy raw bytes (a uint8 engine array) into a tensor of any dtype."""
    dst.detach().reshape(-1).view(torch.uint8).copy_(from_array(src).reshape(-1))


class _Work(dist.Work):
    """One collective in flight on the engine thread: wait() raises its error on this rank."""

    def __init__(self, handle, future: torch.futures.Future, keep=()):
        super().__init__()
        self._handle = handle
        self._future = future
        self._keep = keep            # tensors the engine reads or writes: alive until done

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        self._handle.wait(_seconds(timeout))
        self._keep = ()
        return True

    def is_completed(self) -> bool:
        return self._handle.done()

    def is_success(self) -> bool:
        return self._handle.done() and self._handle._error is None

    def exception(self):
        return self._handle._error

    def get_future(self) -> torch.futures.Future:
        return self._future

    def result(self):
        return self._future.wait()

    def synchronize(self) -> None:
        self.wait()


def engine_work(comm, label: str, fn, tensors, result, blocking: bool = False) -> _Work:
    """Run fn(chan) on the engine thread; the Work's future completes with result() after it.

    The future is set from the engine thread, so callbacks chained on it (DDP's) run
    there too; an error sets it as the future's exception and is raised by wait().
    blocking=True (torch's async_op=False: the caller waits at once) runs it on the
    calling thread when the engine has nothing queued (engine.run_blocking).
    """
    future = torch.futures.Future()

    def job(chan):
        try:
            fn(chan)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        future.set_result(result())

    start = run_blocking if blocking else run_async
    handle = start(comm, label, job, *[t for t in tensors if t is not None])
    return _Work(handle, future, keep=tuple(tensors))


class _P2PWork(dist.Work):
    """A send or receive posted on the group's point-to-point communicator."""

    def __init__(self, request, what: str, finish=None, keep=()):
        super().__init__()
        self._request = request
        self._what = what
        self._finish = finish        # for receives: copy the staged bytes into the tensor, etc.
        self._keep = keep
        self._done = False
        self._source = -1
        self._future = torch.futures.Future()

    def _complete(self, status) -> None:
        self._source = status.Get_source()
        if self._finish is not None:
            self._finish(status)
        self._done = True
        self._keep = ()
        self._future.set_result(None)

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if self._done:
            return True
        seconds = _seconds(timeout)
        limit = None if seconds is None else time.monotonic() + seconds
        status = MPI.Status()

        def done() -> bool:
            if self._request.Test(status):
                return True
            if limit is not None and time.monotonic() > limit:
                self._request.Cancel()
                raise RingReduceError(f"rank {rr.rank()}: {self._what} did not complete within "
                                      f"{seconds:g} s: is its peer posting the matching call?")
            return False

        # Supervised like every engine wait: stall warnings, RINGREDUCE_TIMEOUT, deadlocks.
        _context.wait_until(done, self._what)
        self._complete(status)
        return True

    def is_completed(self) -> bool:
        if not self._done:
            status = MPI.Status()
            if self._request.Test(status):
                self._complete(status)
        return self._done

    def is_success(self) -> bool:
        return self.is_completed()

    def get_future(self) -> torch.futures.Future:
        return self._future

    def _source_rank(self) -> int:
        self.wait()
        return self._source

    def source_rank(self) -> int:
        return self._source_rank()


class ProcessGroupRingReduce(dist.ProcessGroup):
    """A torch process group whose collectives run on the ringreduce engine.

    Parameters
    ----------
    comm : mpi4py communicator of the group's ranks (torch's rank i is its rank i)
    """

    def __init__(self, comm, is_world: bool = False):
        super().__init__(comm.Get_rank(), comm.Get_size())
        self.comm = comm
        self._engine_comm = None if is_world else comm    # None: the init communicator's context
        self._p2p = comm.Dup()       # sends/receives never match the engine's traffic
        self._p2p_lock = threading.Lock()
        self._tag_ub = self._p2p.Get_attr(MPI.TAG_UB)
        self._who = f"rank {rr.rank()}"
        self._group_name = self._group_desc = ""

    # ---------------------------------------------------------------- identity
    def getBackendName(self) -> str:
        return BACKEND

    def name(self) -> str:
        return BACKEND

    # torch keeps a group's name in its C++ backends, and a Python group has none: keep it here.
    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    def getGroupName(self) -> str:
        return self._group_name

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = desc

    def getGroupDesc(self) -> str:
        return self._group_desc

    def __repr__(self) -> str:
        return f"ProcessGroupRingReduce(rank={self.rank()}, size={self.size()})"

    # ---------------------------------------------------------------- plumbing
    def _run(self, label: str, fn, tensors, result, opts=None):
        blocking = opts is not None and not getattr(opts, "asyncOp", True)
        return engine_work(self._engine_comm, label, fn, tensors, result, blocking)

    def _arrays(self, tensors, what):
        return [_array(t, self._who, f"{what} tensor {i}") for i, t in enumerate(tensors)]

    # ------------------------------------------------------------- reductions
    def allreduce(self, tensors, opts=None):
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        op, pre = _reduction(opts.reduceOp if opts is not None else dist.ReduceOp.SUM, self._who)
        arrays = self._arrays(tensors, "all_reduce")

        def fn(chan):
            if len(arrays) == 1:
                allreduce_on(chan, arrays[0], op, "auto", None, None, None, True, pre, 1.0)
                return
            for a, y in zip(arrays, _grouped_on(chan, arrays, op, None, pre, 1.0)):
                a[...] = y

        return self._run("torch all_reduce", fn, tensors, lambda: tensors, opts)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def reduce(self, tensors, opts):
        tensors = list(tensors)
        op, pre = _reduction(opts.reduceOp, self._who)
        root = opts.rootRank
        arrays = self._arrays(tensors, "reduce")

        def fn(chan):
            for a in arrays:
                y = allreduce_on(chan, a, op, "auto", None, None, None, False, pre, 1.0)
                if chan.rank == root:
                    a[...] = y

        return self._run("torch reduce", fn, tensors, lambda: tensors, opts)

    # -------------------------------------------------------------- broadcast
    def broadcast(self, tensors, opts=None):
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        root = opts.rootRank if opts is not None else 0
        arrays = [_raw(t, self._who, f"broadcast tensor {i}") for i, t in enumerate(tensors)]

        def fn(chan):
            for a in arrays:
                broadcast_on(chan, a, root)

        return self._run("torch broadcast", fn, tensors, lambda: tensors, opts)

    # -------------------------------------------------------------- allgather
    def _gather_flat(self, chan, src, outputs) -> None:
        y = allgather_on(chan, src)
        want = sum(_nbytes(o) for o in outputs)
        if y.size != want:
            raise RingReduceError(f"{chan.who}: all_gather: the ranks' inputs total {y.size} "
                                  f"bytes, the outputs {want}")
        at = 0
        for o in outputs:
            nbytes = _nbytes(o)
            _copy_bytes(o, y[at:at + nbytes])
            at += nbytes

    def allgather(self, output_tensors, input_tensors, opts=None):
        inputs = list(input_tensors)
        outputs = [list(o) for o in output_tensors]
        srcs = [_raw(t, self._who, "all_gather input") for t in inputs]
        for o in outputs:
            if len(o) != self.size():
                raise RingReduceError(f"{self._who}: all_gather needs {self.size()} output tensors, "
                                      f"got {len(o)}")

        def fn(chan):
            for src, outs in zip(srcs, outputs):
                self._gather_flat(chan, src, outs)

        flat_outs = [t for o in outputs for t in o]
        return self._run("torch all_gather", fn, inputs + flat_outs, lambda: outputs, opts)

    def allgather_coalesced(self, output_lists, input_list, opts=None):
        return self.allgather(output_lists, input_list, opts)

    def all_gather_single(self, output, input, opts=None):
        return self.all_gather_single_coalesced([output], [input], opts)

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        outputs, inputs = list(outputs), list(inputs)
        srcs = [_raw(t, self._who, "all_gather_into_tensor input") for t in inputs]
        for i, (o, t) in enumerate(zip(outputs, inputs)):
            if o.numel() != t.numel() * self.size():
                raise RingReduceError(f"{self._who}: all_gather_into_tensor: output {i} has {o.numel()} "
                                      f"elements, not {self.size()} x the input's {t.numel()}")

        def fn(chan):
            for src, o in zip(srcs, outputs):
                self._gather_flat(chan, src, [o])

        return self._run("torch all_gather_into_tensor", fn, inputs + outputs, lambda: outputs, opts)

    _allgather_base = all_gather_single
    allgather_into_tensor_coalesced = all_gather_single_coalesced

    # ---------------------------------------------------------- reduce-scatter
    def _scatter_reduced(self, chan, src, out, op, pre, pieces=None) -> None:
        """Reduce src over the ranks and keep piece `rank` (pieces: element counts, even by default)."""
        n = chan.size
        if pieces is None:
            if src.size != out.numel() * n:
                raise RingReduceError(f"{chan.who}: reduce_scatter: the input has {src.size} elements, "
                                      f"not {n} x the output's {out.numel()}")
            pieces = [out.numel()] * n
        elif pieces[chan.rank] != out.numel():
            raise RingReduceError(f"{chan.who}: reduce_scatter: this rank's input piece has "
                                  f"{pieces[chan.rank]} elements, its output {out.numel()}")
        y = reducescatter_on(chan, src, op, pieces, None, pre, 1.0)
        _copy_into(out, y)

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        outputs = list(output_tensors)
        inputs = [list(i) for i in input_tensors]
        op, pre = _reduction(opts.reduceOp if opts is not None else dist.ReduceOp.SUM, self._who)
        for i in inputs:
            if len(i) != self.size():
                raise RingReduceError(f"{self._who}: reduce_scatter needs {self.size()} input tensors, "
                                      f"got {len(i)}")
        srcs = [np.concatenate([_flat(t, self._who, "reduce_scatter input") for t in ins])
                for ins in inputs]
        pieces = [[t.numel() for t in ins] for ins in inputs]

        def fn(chan):
            for src, out, p in zip(srcs, outputs, pieces):
                self._scatter_reduced(chan, src, out, op, pre, p)

        return self._run("torch reduce_scatter", fn, outputs + [t for i in inputs for t in i],
                         lambda: outputs, opts)

    def reduce_scatter_single(self, output, input, opts=None):
        return self.reduce_scatter_single_coalesced([output], [input], opts)

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        outputs, inputs = list(outputs), list(inputs)
        op, pre = _reduction(opts.reduceOp if opts is not None else dist.ReduceOp.SUM, self._who)
        srcs = [_flat(t, self._who, "reduce_scatter_tensor input") for t in inputs]

        def fn(chan):
            for src, out in zip(srcs, outputs):
                self._scatter_reduced(chan, src, out, op, pre)

        return self._run("torch reduce_scatter_tensor", fn, outputs + inputs, lambda: outputs, opts)

    _reduce_scatter_base = reduce_scatter_single
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # --------------------------------------------------------------- all-to-all
    def _rows(self, t: torch.Tensor, splits, what: str) -> list[int]:
        first = t.shape[0] if t.dim() else 1
        if splits:
            return [int(s) for s in splits]
        if first % self.size():
            raise RingReduceError(f"{self._who}: {what}: the first dimension ({first}) does not divide "
                                  f"evenly into {self.size()} ranks; pass split sizes")
        return [first // self.size()] * self.size()

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        if not input.dim() or not output.dim():
            raise RingReduceError(f"{self._who}: all_to_all_single needs tensors with a first dimension")
        send_rows = self._rows(input, input_split_sizes, "all_to_all_single")
        recv_rows = self._rows(output, output_split_sizes, "all_to_all_single")
        row_bytes = int(np.prod(input.shape[1:], dtype=np.int64)) * input.element_size()
        src = _raw(input, self._who, "all_to_all_single input").reshape(input.shape[0], row_bytes)

        def fn(chan):
            got, counts = alltoall_on(chan, src, send_rows)
            if [int(c) for c in counts] != recv_rows:
                raise RingReduceError(f"{chan.who}: all_to_all_single: received row counts "
                                      f"{[int(c) for c in counts]}, but output_split_sizes say "
                                      f"{recv_rows}")
            _copy_bytes(output, got)

        return self._run("torch all_to_all_single", fn, [input, output], lambda: [output], opts)

    alltoall_base = all_to_all_single

    def alltoall(self, output_tensors, input_tensors, opts=None):
        outputs, inputs = list(output_tensors), list(input_tensors)
        n = self.size()
        if len(outputs) != n or len(inputs) != n:
            raise RingReduceError(f"{self._who}: all_to_all needs {n} input and {n} output tensors, "
                                  f"got {len(inputs)} and {len(outputs)}")
        parts = [_raw(t, self._who, f"all_to_all input {i}") for i, t in enumerate(inputs)]
        src = np.concatenate(parts)
        splits = [p.size for p in parts]
        expect = [_nbytes(o) for o in outputs]

        def fn(chan):
            got, counts = alltoall_on(chan, src, splits)
            if [int(c) for c in counts] != expect:
                raise RingReduceError(f"{chan.who}: all_to_all: received byte counts "
                                      f"{[int(c) for c in counts]}, but the outputs hold {expect}")
            at = 0
            for o, c in zip(outputs, expect):
                _copy_bytes(o, got[at:at + c])
                at += c

        return self._run("torch all_to_all", fn, inputs + outputs, lambda: outputs, opts)

    # ------------------------------------------------------- gather / scatter
    # Both are alltoalls with one non-empty split: each rank's bytes go to (or come from) the root.
    def gather(self, output_tensors, input_tensors, opts):
        root, n = opts.rootRank, self.size()
        inputs = list(input_tensors)
        outputs = [list(o) for o in output_tensors]
        me = self.rank()
        if me == root and (len(outputs) != len(inputs) or any(len(o) != n for o in outputs)):
            raise RingReduceError(f"{self._who}: gather on the root needs {n} output tensors per input")
        srcs = [_raw(t, self._who, "gather input") for t in inputs]

        def fn(chan):
            for i, src in enumerate(srcs):
                splits = [src.size if r == root else 0 for r in range(n)]
                got, counts = alltoall_on(chan, src, splits)
                if me == root:
                    at = 0
                    for o, c in zip(outputs[i], counts):
                        if int(c) != _nbytes(o):
                            raise RingReduceError(f"{chan.who}: gather: a rank sent {int(c)} bytes "
                                                  f"for an output of {_nbytes(o)}")
                        _copy_bytes(o, got[at:at + int(c)])
                        at += int(c)

        flat_outs = [t for o in outputs for t in o]
        return self._run("torch gather", fn, inputs + flat_outs, lambda: outputs, opts)

    def scatter(self, output_tensors, input_tensors, opts):
        root, n = opts.rootRank, self.size()
        outputs = list(output_tensors)
        inputs = [list(i) for i in input_tensors]
        me = self.rank()
        if me == root and (len(inputs) != len(outputs) or any(len(i) != n for i in inputs)):
            raise RingReduceError(f"{self._who}: scatter on the root needs {n} input tensors per output")
        if me == root:
            srcs = [np.concatenate([_raw(t, self._who, "scatter input") for t in ins]) for ins in inputs]
            splits = [[_nbytes(t) for t in ins] for ins in inputs]
        else:
            srcs = [_raw(o, self._who, "scatter output")[:0] for o in outputs]
            splits = [[0] * n for _ in outputs]

        def fn(chan):
            for src, s, out in zip(srcs, splits, outputs):
                got, counts = alltoall_on(chan, src, s)
                if int(counts[root]) != _nbytes(out):
                    raise RingReduceError(f"{chan.who}: scatter: the root sent {int(counts[root])} "
                                          f"bytes for an output of {_nbytes(out)}")
                _copy_bytes(out, got)

        return self._run("torch scatter", fn, outputs + [t for i in inputs for t in i],
                         lambda: outputs, opts)

    # ----------------------------------------------------------------- barrier
    def barrier(self, opts=None):
        return self._run("torch barrier", _barrier_on, [], list, opts)

    # -------------------------------------------------------- point-to-point
    def _tag(self, tag: int) -> int:
        if not 0 <= tag <= self._tag_ub:
            raise RingReduceError(f"{self._who}: tag {tag} is outside MPI's range 0..{self._tag_ub}")
        return tag

    def _peer(self, peer: int, what: str) -> int:
        if not 0 <= peer < self.size():
            raise RingReduceError(f"{self._who}: {what} peer {peer} is out of range for "
                                  f"{self.size()} ranks")
        return peer

    def send(self, tensors, dstRank, tag=0):
        t = tensors if isinstance(tensors, torch.Tensor) else next(iter(tensors))
        dst = self._peer(dstRank, "send")
        host = t.detach().contiguous().cpu() if (t.is_cuda or not t.is_contiguous()) else t.detach()
        raw = host.reshape(-1).view(torch.uint8).numpy()
        with self._p2p_lock:
            req = self._p2p.Isend([raw, MPI.BYTE], dst, self._tag(tag))
        return _P2PWork(req, f"send of {raw.size} bytes to rank {dst} (tag {tag})", keep=(host,))

    def _recv(self, tensors, src, tag, what):
        t = tensors if isinstance(tensors, torch.Tensor) else next(iter(tensors))
        staged = not (t.is_contiguous() and not t.is_cuda)
        host = torch.empty_like(t, device="cpu").contiguous() if staged else t.detach()
        raw = host.reshape(-1).view(torch.uint8).numpy()

        def finish(status):
            if status.Get_count(MPI.BYTE) != raw.size:
                raise RingReduceError(f"{self._who}: {what}: expected {raw.size} bytes, got "
                                      f"{status.Get_count(MPI.BYTE)}")
            if staged:
                t.copy_(host)

        with self._p2p_lock:
            req = self._p2p.Irecv([raw, MPI.BYTE], src, self._tag(tag) if tag >= 0 else MPI.ANY_TAG)
        return _P2PWork(req, what, finish, keep=(t, host))

    def recv(self, tensors, srcRank, tag=0):
        src = self._peer(srcRank, "recv")
        return self._recv(tensors, src, tag, f"recv from rank {src} (tag {tag})")

    def recv_anysource(self, tensors, tag=0):
        return self._recv(tensors, MPI.ANY_SOURCE, tag, f"recv from any rank (tag {tag})")

    # --------------------------------------------------------------- lifetime
    def shutdown(self) -> None:
        if self._p2p is not None and not MPI.Is_finalized():
            self._p2p.Free()
        self._p2p = None

    def abort(self) -> None:
        self.shutdown()


# --------------------------------------------------------------- registration
def _create(dist_opts, backend_opts) -> ProcessGroupRingReduce:
    """torch calls this for init_process_group and for every new_group on this backend."""
    if _torch_version() < MIN_TORCH:
        raise RingReduceError(f"the ringreduce backend needs torch >= {'.'.join(map(str, MIN_TORCH))}; "
                              f"this is torch {torch.__version__}")
    rr.init()
    world = _context.world_comm()
    size, rank = dist_opts.group_size, dist_opts.group_rank
    ranks = list(dist_opts.global_ranks_in_group or [])
    if not ranks or ranks == list(range(world.Get_size())):
        if size != world.Get_size() or rank != world.Get_rank():
            hint = (" Each process here is its own one-rank MPI world (torchrun and similar "
                    "launchers start processes MPI does not know about): launch with mpirun or srun "
                    "instead.") if world.Get_size() == 1 else ""
            raise RingReduceError(f"rank {world.Get_rank()}: torch.distributed says rank {rank} of "
                                  f"{size}, but MPI says rank {world.Get_rank()} of {world.Get_size()}: "
                                  f"the ringreduce backend needs torch's ranks to be MPI's.{hint}")
        if dist_opts.timeout is not None and dist_opts.timeout != default_pg_timeout:
            # the user's timeout=, not torch's default
            _context.use_timeout(dist_opts.timeout.total_seconds())
        return ProcessGroupRingReduce(world, is_world=True)
    # A sub-group: MPI_Comm_create_group is collective over its members only, as torch calls us.
    group = world.Get_group().Incl(ranks)
    try:
        comm = world.Create_group(group)
    finally:
        group.Free()
    if comm.Get_rank() != rank or comm.Get_size() != size:
        raise RingReduceError(f"rank {world.Get_rank()}: new_group({ranks}): torch's group rank {rank} "
                              f"of {size} does not match MPI's {comm.Get_rank()} of {comm.Get_size()}")
    return ProcessGroupRingReduce(comm)


_registered = False


def register() -> None:
    """Register the "ringreduce" backend with torch.distributed (done by ``import ringreduce.torch``)."""
    global _registered
    if _registered or BACKEND in dist.Backend.backend_list:
        _registered = True
        return
    dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])
    _registered = True


def init_process_group(backend: str = BACKEND, **kwargs) -> None:
    """Initialise ringreduce and torch.distributed in one call under mpirun/srun.

    Rank and world size come from MPI; no MASTER_ADDR, port or rendezvous file
    is needed (the group's traffic is all MPI, so torch gets a process-local
    store). Other keyword arguments (``timeout=``, ``device_id=``) go to
    ``torch.distributed.init_process_group``.

    Example::

        import ringreduce.torch as rrt
        rrt.init_process_group()
        model = torch.nn.parallel.DistributedDataParallel(model)
    """
    rr.init()
    register()
    if dist.is_initialized():
        raise RingReduceError(f"rank {rr.rank()}: torch.distributed is already initialised")
    if "init_method" not in kwargs and "store" not in kwargs:
        kwargs["store"] = dist.HashStore()
    kwargs.setdefault("rank", rr.rank())
    kwargs.setdefault("world_size", rr.size())
    dist.init_process_group(backend, **kwargs)
