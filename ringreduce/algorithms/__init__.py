"""Allreduce algorithms over mpi4py: each reduces a flat host buffer in place."""
from . import allgather, hierarchical, mpi, ring, shm, tree  # noqa: F401

# name -> function(chan, flat_buffer, op)
RUNNERS = {
    "ring": ring.allreduce,
    "tree": tree.allreduce,
    "shm": shm.run,
    "hierarchical": hierarchical.allreduce,
}
