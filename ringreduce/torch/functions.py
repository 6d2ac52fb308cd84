"""Collectives on torch objects: parameter/optimizer-state broadcast, metrics, join.

Example
-------
>>> import ringreduce.torch as rrt
>>> rrt.broadcast_parameters(model.state_dict(), root_rank=0)
>>> rrt.broadcast_optimizer_state(opt, root_rank=0)
>>> epoch = rrt.broadcast_object(epoch, root_rank=0)

The tensor collectives (allreduce, allgather, ...) are in
:mod:`ringreduce.torch.mpi_ops`.
"""

from __future__ import annotations

import logging

import torch

import ringreduce as rr

from ._convert import byte_view, to_array
from .optimizer import Joinable, _error, _live_optimizers

__all__ = [
    "broadcast_parameters",
    "broadcast_optimizer_state",
    "broadcast_object",
    "allgather_object",
    "join",
]

log = logging.getLogger(__name__)


def _broadcast_tensors(tensors, root_rank, comm=None):
    """Broadcast tensors in place from ``root_rank`` as one packed byte buffer."""
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return
    on_cpu = all(not t.is_cuda for t in tensors)
    device = torch.device("cpu") if on_cpu else tensors[0].device
    sizes = [t.numel() * t.element_size() for t in tensors]
    packed = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    me = rr.rank() if comm is None else comm.Get_rank()
    if me == root_rank:
        off = 0
        for t, n in zip(tensors, sizes):
            packed[off:off + n].copy_(byte_view(t.contiguous()))
            off += n
    rr.broadcast_(to_array(packed), root_rank=root_rank, comm=comm)
    if me != root_rank:
        off = 0
        for t, n in zip(tensors, sizes):
            src = packed[off:off + n].view(t.dtype).view(t.shape)
            with torch.no_grad():
                t.copy_(src)
            off += n


def broadcast_parameters(params, root_rank: int = 0, comm=None) -> None:
    """Copy parameters/buffers from ``root_rank`` to every rank, in place.

    ``params`` is ``model.state_dict()``, ``model.named_parameters()`` or a
    list of tensors; every rank must pass the same names in the same order.

    Example
    -------
    >>> rrt.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    if isinstance(params, dict):
        items = list(params.items())
    else:
        items = list(params)
        if items and not isinstance(items[0], tuple):
            items = [(str(i), t) for i, t in enumerate(items)]
    tensors = [t for _, t in items if isinstance(t, torch.Tensor)]
    _broadcast_tensors(tensors, root_rank, comm)


def _split_tensors(obj, out):
    """Replace tensors in a nested state dict by placeholders, collecting them."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return _TensorSlot(len(out) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _split_tensors(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split_tensors(v, out) for v in obj)
    return obj


def _fill_tensors(obj, tensors):
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill_tensors(v, tensors) for v in obj)
    return obj


class _TensorSlot:
    __slots__ = ("index", "shape", "dtype")

    def __init__(self, index, shape, dtype):
        self.index, self.shape, self.dtype = index, shape, dtype

    def __getstate__(self):
        return (self.index, self.shape, str(self.dtype).replace("torch.", ""))

    def __setstate__(self, s):
        self.index, self.shape = s[0], s[1]
        self.dtype = getattr(torch, s[2])


def broadcast_optimizer_state(optimizer, root_rank: int = 0, comm=None, model=None) -> None:
    """Make every rank's optimizer state (and hyperparameters) equal to ``root_rank``'s.

    Works for every torch.optim optimizer, wrapped or not, including state that
    is created lazily (Adam before its first step): the root's state dict
    structure travels as a small object, its tensors as one packed broadcast,
    and the other ranks load it with ``load_state_dict``. No dummy step is taken,
    so parameters and step counters are untouched; as after Horovod's (which
    steps on zero gradients), every parameter that requires a gradient and
    had none holds zeros afterwards. ``model`` is Horovod's (it finds sparse
    parameters there); accepted, not needed.

    Example
    -------
    >>> rrt.broadcast_optimizer_state(opt, root_rank=0)
    """
    from .optimizer import _DistributedOptimizerMixin

    if isinstance(comm, torch.nn.Module):   # Horovod's third positional argument is model
        comm = None

    me = rr.rank() if comm is None else comm.Get_rank()
    base_sd = (super(_DistributedOptimizerMixin, optimizer).state_dict
               if isinstance(optimizer, _DistributedOptimizerMixin) else optimizer.state_dict)
    skeleton = None
    tensors: list = []
    if me == root_rank:
        skeleton = _split_tensors(base_sd(), tensors)
    skeleton = rr.broadcast_object(skeleton, root_rank=root_rank, **({} if comm is None else {"comm": comm}))
    if me != root_rank:
        slots: list = []
        _collect_slots(skeleton, slots)
        slots.sort(key=lambda s: s.index)
        tensors = [torch.empty(s.shape, dtype=s.dtype) for s in slots]
    _broadcast_tensors(tensors, root_rank, comm)
    if me != root_rank:
        sd = _fill_tensors(skeleton, tensors)
        if isinstance(optimizer, _DistributedOptimizerMixin):
            super(_DistributedOptimizerMixin, optimizer).load_state_dict(sd)
        else:
            optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:      # Horovod leaves zero gradients (test_broadcast_state_no_grad)
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


def _collect_slots(obj, out):
    if isinstance(obj, _TensorSlot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_slots(v, out)


def broadcast_object(obj, root_rank: int = 0, name=None, process_set=None):
    """Return ``root_rank``'s picklable ``obj`` on every rank (Horovod's signature).

    Example
    -------
    >>> epoch = rrt.broadcast_object(epoch, root_rank=0)
    """
    kw = {} if process_set is None else {"process_set": process_set}
    return rr.broadcast_object(obj, root_rank=root_rank, **kw)


def allgather_object(obj, name=None, process_set=None) -> list:
    """Return the list of every rank's ``obj``, indexed by rank (in ``process_set``).

    Example
    -------
    >>> counts = rrt.allgather_object(len(my_shard))
    """
    kw = {} if process_set is None else {"process_set": process_set}
    return rr.allgather_object(obj, **kw)


def join(device=-1) -> int:
    """Wait here until every rank has joined, serving the others' collectives meanwhile.

    A rank that runs out of data calls ``join()``. Until every rank has called
    it, this rank takes part in every collective of the ranks still working
    (Horovod's semantics; ``rr.join`` in ringreduce.runtime.join): their
    DistributedOptimizer steps, metric allreduces, allgathers, broadcasts,
    barriers and the rest, async forms included. It contributes zeros (the op's
    identity; no rows to a gather). As in Horovod, a plain ``allreduce(op=Average)``
    then still divides by every rank; a DistributedOptimizer's step averages
    over the ranks still training (it counts them). The joined rank does
    not update its own parameters: after ``join()`` returns, broadcast the
    model and optimizer state from the returned rank. A broadcast whose root
    has joined is an error on every rank.

    ``device`` is Horovod's argument (where its zero tensors live); accepted
    and unused: the joined rank's contributions live on the host.

    Returns
    -------
    int
        The rank that joined last (the highest one if several joined together).

    Example
    -------
    >>> for batch in my_uneven_shard:
    ...     opt.zero_grad(); loss_fn(model(batch)).backward(); opt.step()
    >>> last = rrt.join()
    >>> rrt.broadcast_parameters(model.state_dict(), root_rank=last)
    >>> rrt.broadcast_optimizer_state(opt, root_rank=last)
    """
    opts: list[Joinable] = _live_optimizers()
    if rr.size() == 1:
        return 0
    if any(o.needs_synchronize() for o in opts):
        raise _error("join() called with a backward pass not yet stepped; call step() "
                     "or synchronize() first")
    last = rr.join()
    for o in opts:
        o.end_join()
    log.debug("rank %d: join done, last rank to join was %d", rr.rank(), last)
    return last