"""Layer 2, algorithms: ring, tree, allgather, native, shm and hierarchical allreduce.

Each reduces a flat host (or device) buffer in place on a transport channel;
``registry`` names them with their cost terms and capabilities.
"""
