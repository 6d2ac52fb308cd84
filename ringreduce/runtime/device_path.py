"""The GPU path of the collectives: cupy buffers through CUDA-aware MPI or pinned staging.

``collectives.allreduce_on`` / ``broadcast_on`` validate, run the mismatch check
(whose algorithm field names the device mode, see :func:`label`) and then hand
device arrays here:

* CUDA-aware MPI: the very same algorithms run on the cupy arrays. Their
  reductions are cupy kernels (numpy ufuncs dispatch to cupy through
  ``__array_ufunc__``), their scratch comes from the channel's pool on the
  device (``ScratchPool.using(cupy)``), and mpi4py gives MPI the device
  pointers (``__cuda_array_interface__``).
* otherwise, and for the shared-memory algorithms ("shm", "hierarchical",
  which reduce in host windows): ``staging.Stager`` pipes the buffer through
  pinned host slots and each segment is reduced by the host engine.

``gather`` and ``reducescatter`` hand theirs to :func:`moved`: the same two
modes for allgather, reduce-scatter and alltoall, whose outputs differ in
shape from their inputs (staged: the input comes down through the pinned
slots, the host engine runs the collective, the result goes up).

Stream rule (``device`` module docstring): the caller's current stream is
synchronized before MPI first reads the buffer and again before returning, so
the result is complete on the device when the call returns.

Example::

    import cupy as cp, ringreduce as rr
    g = cp.ones(1 << 20, cp.float32)
    rr.allreduce_(g, op=rr.Sum)           # g == rr.size() everywhere, still on the GPU
"""
from __future__ import annotations

import numpy as np

from ..algorithms import native, registry
from ..compression.algorithm import compressed_allreduce
from ..core import config, device
from ..transport import staging

__all__ = ["label", "allreduce", "broadcast", "moved", "direct", "to_host", "from_host"]

# Algorithms that reduce in host shared memory (MPI windows): always staged.
HOST_ONLY = ("shm", "hierarchical")


def label(algorithm: str) -> str:
    """The algorithm field of a device call's fingerprint, e.g. 'ring on device (staged)'."""
    return f"{algorithm} on device ({device.mode().name})"


def allreduce(chan, flat, op, algorithm: str, comp, name) -> None:
    """Reduce the flat cupy array in place, every rank with the same bits."""
    with flat.device:   # the engine thread's current device may be another one
        _allreduce(chan, flat, op, algorithm, comp, name)


def _run(chan, algorithm: str, buf, op) -> None:
    """An algorithm on a device or staged host buffer, native MPI as the host path runs it."""
    if algorithm == "mpi":
        # Blocking once agreed, like the host path: the same MPI call, the same bits.
        native.allreduce(chan, buf, op, agreed=config.check_enabled())
    else:
        registry.run(chan, algorithm, buf, op)


def _allreduce(chan, flat, op, algorithm: str, comp, name) -> None:
    device.synchronize(flat)
    try:
        if device.mode().aware and algorithm not in HOST_ONLY:
            with chan.pool.using(device.array_module(flat)):
                if comp is not None:
                    compressed_allreduce(chan, flat, op, algorithm, comp, name)
                else:
                    _run(chan, algorithm, flat, op)
        elif comp is not None:
            # Error feedback keeps one residual per tensor: stage the tensor in one piece.
            staging.stager_for(chan, flat).run(
                flat, lambda host, _k: compressed_allreduce(chan, host, op, algorithm, comp, name),
                segment_bytes=max(flat.nbytes, 1))
        else:
            # Each segment is its own host allreduce, in the same order on every rank.
            staging.stager_for(chan, flat).run(
                flat, lambda host, _k: _run(chan, algorithm, host, op))
    finally:
        device.synchronize(flat)


def broadcast(chan, x, root_rank: int, bcast_bytes) -> None:
    """Broadcast cupy array x in place; bcast_bytes(chan, arr, root) moves one buffer's bytes."""
    with x.device:
        _broadcast(chan, x, root_rank, bcast_bytes)


def _broadcast(chan, x, root_rank: int, bcast_bytes) -> None:
    device.synchronize(x)
    try:
        if device.mode().aware:
            bcast_bytes(chan, x, root_rank)
        else:
            root = chan.rank == root_rank   # the root only sends, the others only receive
            staging.stager_for(chan, x).run(
                x.reshape(-1), lambda host, _k: bcast_bytes(chan, host, root_rank),
                download=root, upload=not root)
    finally:
        device.synchronize(x)


# -- the collectives that do not reduce in place: allgather, reducescatter, alltoall ---------
# Each takes a runner that works on flat buffers; CUDA-aware MPI gets the device buffers
# themselves (unless the algorithm works in a host window), otherwise the input is staged
# down through the pinned slots, the host runs the collective, and the result is staged up.

def to_host(chan, x) -> np.ndarray:
    """A flat host copy of cupy array x, through the channel's pinned stager (segment by segment)."""
    flat = x.reshape(-1)
    host = np.empty(flat.size, flat.dtype)
    st = staging.stager_for(chan, flat)
    bounds = staging.segment_bounds(flat.size, flat.itemsize, st.segment_bytes)

    def take(seg, k):
        lo, hi = bounds[k]
        host[lo:hi] = seg

    st.run(flat, take, upload=False)
    return host


def from_host(chan, host: np.ndarray, out) -> None:
    """Copy flat host array `host` into cupy array `out` through the pinned stager."""
    flat = out.reshape(-1)
    st = staging.stager_for(chan, flat)
    bounds = staging.segment_bounds(flat.size, flat.itemsize, st.segment_bytes)

    def put(seg, k):
        lo, hi = bounds[k]
        seg[...] = host[lo:hi]

    st.run(flat, put, download=False)


def direct(algorithm: str | None = None) -> bool:
    """Whether device buffers go to MPI as they are (CUDA-aware, and not a host-window algorithm)."""
    return device.mode().aware and algorithm not in HOST_ONLY


def moved(chan, x, out, algorithm: str | None, run) -> None:
    """run(chan, src, dst) on device buffers (direct) or on staged host copies; dst -> out.

    `src` and `dst` are flat arrays of x's and out's dtypes; the stream rule holds
    on both sides (the caller's stream is synchronized before MPI reads x and
    before returning).
    """
    with x.device:
        device.synchronize(x)
        try:
            if direct(algorithm):
                with chan.pool.using(device.array_module(x)):
                    run(chan, x.reshape(-1), out.reshape(-1))
            else:
                dst = np.empty(out.size, out.dtype)
                run(chan, to_host(chan, x), dst)
                from_host(chan, dst, out)
        finally:
            device.synchronize(out)
