"""Allreduce algorithms over mpi4py: each reduces a flat host buffer in place."""
from . import allgather, hierarchical, mpi, ring, shm, tree  # noqa: F401

# name -> function(chan, flat_buffer, op)
RUNNERS = {
    "ring": ring.allreduce,
    "tree": tree.allreduce,
    "shm": shm.run,
    "hierarchical": hierarchical.allreduce,
}

# Algorithms that can read the input from a separate array (out-of-place calls
# skip copying the input into the result first): function(chan, flat_out, op, src=flat_in)
SOURCE_RUNNERS = {
    "shm": shm.run,
    "mpi": lambda chan, buf, op, src: mpi.allreduce(chan, buf, op, src=src),
}
