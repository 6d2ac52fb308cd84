"""ringreduce: an MPI ring/tree allreduce engine for data-parallel training.

Example::

    import numpy as np, ringreduce as rr
    rr.init()
    y = rr.allreduce(np.arange(10, dtype=np.float32) * rr.rank(), op=rr.Average)
"""
# First: the MPI thread level and Open MPI's osc setting must precede MPI_Init.
from .core import mpi as _mpi  # noqa: F401  # isort: skip
from .compression import Compression, last_stats
from .core.errors import RingReduceError
from .core.ops import Average, Max, Min, Product, ReduceOp, Sum
from .runtime.collectives import (
                                  allgather_object,
                                  allreduce,
                                  allreduce_,
                                  broadcast_,
                                  broadcast_object,
                                  compression_state,
)
from .runtime.context import (
                                  init,
                                  is_initialized,
                                  local_rank,
                                  local_size,
                                  rank,
                                  shutdown,
                                  size,
                                  wire_stats,
)
from .runtime.engine import Handle, allreduce_async
from .runtime.gather import (
                                  allgather,
                                  allgather_async,
                                  alltoall,
                                  alltoall_async,
                                  barrier,
                                  broadcast,
                                  broadcast_async,
)
from .runtime.info import info
from .runtime.join import join
from .runtime.process_sets import (
                                  ProcessSet,
                                  add_process_set,
                                  global_process_set,
                                  remove_process_set,
)
from .runtime.reducescatter import (
                                  grouped_allgather,
                                  grouped_allgather_async,
                                  grouped_allreduce,
                                  grouped_allreduce_async,
                                  grouped_reducescatter,
                                  grouped_reducescatter_async,
                                  reducescatter,
                                  reducescatter_async,
)

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
    "Sum", "Average", "Min", "Max", "Product", "ReduceOp",
    "allreduce", "allreduce_", "allreduce_async", "Handle",
    "broadcast_", "broadcast_object", "allgather_object",
    "allgather", "allgather_async", "reducescatter", "reducescatter_async", "alltoall", "alltoall_async",
    "broadcast", "broadcast_async", "barrier", "join",
    "grouped_allreduce", "grouped_allreduce_async", "grouped_allgather", "grouped_allgather_async",
    "grouped_reducescatter", "grouped_reducescatter_async",
    "ProcessSet", "add_process_set", "remove_process_set", "global_process_set",
    "info", "RingReduceError",
    "Compression", "compression_state", "last_stats", "wire_stats",
]
