"""ringreduce for PyTorch: Horovod's torch API on the ringreduce engine.

Switch from Horovod by changing the import::

    import ringreduce.torch as hvd   # was: import horovod.torch as hvd

Every name of ``horovod.torch`` exists here (docs/torch.md lists them with
what each does; Adasum and elastic raise NotImplementedError). The modules:
mpi_ops (the tensor collectives and their autograd), basics (init, ranks,
what is built), compression (Horovod's Compressor interface), optimizer
(DistributedOptimizer), functions (state broadcast, objects, join),
sync_batch_norm, elastic (refused); localsgd / diloco are ringreduce's own.

Example
-------
>>> import ringreduce.torch as rrt
>>> rrt.init()
>>> opt = rrt.DistributedOptimizer(opt, named_parameters=model.named_parameters())
>>> rrt.broadcast_parameters(model.state_dict(), root_rank=0)
>>> rrt.broadcast_optimizer_state(opt, root_rank=0)
"""

import ringreduce as _rr

from . import elastic
from .basics import (
    HorovodInternalError,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    rocm_built,
    shutdown,
    size,
    start_timeline,
    stop_timeline,
)
from .compression import Compression, Compressor
from .backend import init_process_group
from .backend import register as _register_backend
from .diloco import DiLoCo
from .hooks import HookState, compression_hook
from .functions import (
    allgather_object,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
    join,
)
from .localsgd import LocalSGD, SyncRecord, SyncTotals
from .mpi_ops import (
    Adasum,
    Average,
    Max,
    Min,
    Product,
    Sum,
    allgather,
    allgather_async,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    alltoall,
    alltoall_async,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    grouped_allgather,
    grouped_allgather_async,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_reducescatter,
    grouped_reducescatter_async,
    poll,
    reducescatter,
    reducescatter_async,
    sparse_allreduce_async,
    synchronize,
)
from .optimizer import DistributedOptimizer
from .sync_batch_norm import SyncBatchNorm

RingReduceError = _rr.RingReduceError
ProcessSet = _rr.ProcessSet
add_process_set = _rr.add_process_set
remove_process_set = _rr.remove_process_set
global_process_set = _rr.global_process_set

_register_backend()      # torch.distributed.init_process_group("ringreduce") works from here on

# Horovod's names first (docs/torch.md, "Switching from Horovod"), then ringreduce's own.
__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank",
    "cross_size", "cross_rank", "is_homogeneous", "mpi_threads_supported", "mpi_enabled",
    "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built", "ccl_built",
    "cuda_built", "rocm_built", "start_timeline", "stop_timeline", "HorovodInternalError",
    "Average", "Sum", "Min", "Max", "Product", "Adasum", "ProcessSet", "add_process_set",
    "remove_process_set", "global_process_set", "allreduce", "allreduce_", "allreduce_async",
    "allreduce_async_", "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async",
    "grouped_allreduce_async_", "allgather", "allgather_async", "grouped_allgather",
    "grouped_allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_",
    "alltoall", "alltoall_async", "reducescatter", "reducescatter_async", "grouped_reducescatter",
    "grouped_reducescatter_async", "sparse_allreduce_async", "poll", "synchronize", "barrier",
    "join", "broadcast_object", "allgather_object", "broadcast_parameters",
    "broadcast_optimizer_state", "DistributedOptimizer", "SyncBatchNorm", "Compression",
    "Compressor", "elastic",
    "RingReduceError", "LocalSGD", "DiLoCo", "SyncRecord", "SyncTotals", "init_process_group",
    "HookState", "compression_hook",
]
