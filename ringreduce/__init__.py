"""ringreduce: an MPI ring/tree allreduce engine for data-parallel training.

Example::

    import numpy as np, ringreduce as rr
    rr.init()
    y = rr.allreduce(np.arange(10, dtype=np.float32) * rr.rank(), op=rr.Average)
"""
from .comm import init, local_rank, local_size, rank, shutdown, size
from .collectives import allgather_object, allreduce, allreduce_, broadcast_, broadcast_object
from .compression import Compression, compression_state, last_stats
from .engine import Handle, allreduce_async
from .errors import RingReduceError
from .info import info
from .ops import Average, Max, Min, ReduceOp, Sum

__all__ = [
    "init", "shutdown", "rank", "size", "local_rank", "local_size",
    "Sum", "Average", "Min", "Max", "ReduceOp",
    "allreduce", "allreduce_", "allreduce_async", "Handle",
    "broadcast_", "broadcast_object", "allgather_object",
    "info", "RingReduceError",
    "Compression", "compression_state", "last_stats",
]
