"""ringreduce for PyTorch: Horovod's torch API on the ringreduce engine.

Switch from Horovod by changing the import::

    import ringreduce.torch as hvd   # was: import horovod.torch as hvd

Example
-------
>>> import ringreduce.torch as rrt
>>> rrt.init()
>>> opt = rrt.DistributedOptimizer(opt, named_parameters=model.named_parameters())
>>> rrt.broadcast_parameters(model.state_dict(), root_rank=0)
>>> rrt.broadcast_optimizer_state(opt, root_rank=0)
"""

import ringreduce as _rr

from .functions import (
    allgather_object,
    allreduce,
    allreduce_,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
    join,
)
from .optimizer import DistributedOptimizer
from .localsgd import LocalSGD, SyncRecord, SyncTotals
from .diloco import DiLoCo

# Horovod-style access to the engine's names from the torch module.
_ENGINE_NAMES = ["init", "shutdown", "rank", "size", "local_rank", "local_size",
                 "Sum", "Average", "Min", "Max", "Compression", "RingReduceError"]
for _n in _ENGINE_NAMES:
    if hasattr(_rr, _n):
        globals()[_n] = getattr(_rr, _n)


def __getattr__(name):
    # Names the engine grows later (e.g. Compression) resolve at first use.
    if name in _ENGINE_NAMES:
        return getattr(_rr, name)
    raise AttributeError(f"module 'ringreduce.torch' has no attribute {name!r}")


__all__ = [
    "DistributedOptimizer",
    "broadcast_parameters",
    "broadcast_optimizer_state",
    "broadcast_object",
    "allgather_object",
    "allreduce",
    "allreduce_",
    "join",
] + _ENGINE_NAMES
__all__ += ["LocalSGD", "DiLoCo", "SyncRecord", "SyncTotals"]
