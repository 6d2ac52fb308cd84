"""Staging device buffers through pinned host memory, for MPI libraries that are not CUDA-aware.

The flat device buffer is cut into segments. Each segment is copied to a pinned
host slot (D2H), reduced across ranks by the host engine, and copied back (H2D).
The copies run on two dedicated CUDA streams, so while the host works on
segment k the copy engines are already bringing segment k+1 down and taking
segment k-1 back up::

    d2h stream:  D2H(0) D2H(1)        D2H(2)        D2H(3) ...
    host:               [ reduce 0 ]  [ reduce 1 ]  [ reduce 2 ] ...
    h2d stream:                       H2D(0)        H2D(1)        ...

Ordering, enforced with CUDA events (no host waits except where the host
itself touches the data):

* the copy streams first wait for the caller's current stream (it wrote the
  input, and may still be reading the output buffer);
* the host waits for D2H(k) before reducing segment k;
* a slot is reused by D2H(k + slots) only after H2D(k) has read it (the d2h
  stream waits on H2D(k)'s event); when nothing is downloaded (a broadcast's
  receivers) the host waits for H2D(k) before writing the slot itself;
* ``run`` returns after every upload has finished: the result is on the device.

The schedule is written against the small :class:`Copier` interface, so it is
tested on the CPU with numpy buffers standing in for device memory
(:class:`HostCopier`, and the adversarial stream simulator in
tests/test_staging.py); :class:`CupyCopier` is the CUDA implementation.

Example
-------
>>> import numpy as np
>>> from ringreduce.transport.staging import HostCopier, Stager
>>> dev = np.arange(10, dtype=np.float32)          # stands in for a device array
>>> st = Stager(HostCopier(), segment_bytes=16)
>>> st.run(dev, lambda host, k: np.multiply(host, 2, out=host))
>>> dev[:4]
array([0., 2., 4., 6.], dtype=float32)
"""
from __future__ import annotations

import numpy as np

from ..core.device import DEFAULT_SEGMENT_BYTES, staging_segment_bytes

__all__ = ["Copier", "HostCopier", "CupyCopier", "Stager", "segment_bounds", "stager_for",
           "DEFAULT_SEGMENT_BYTES", "DEFAULT_SLOTS"]

# Big enough that each segment's host allreduce is bandwidth-bound, small enough
# that a few segments keep both copy engines busy. RINGREDUCE_STAGING_BYTES overrides.
# Three slots: one coming down, one on the host, one going up.
DEFAULT_SLOTS = 3


class Copier:
    """Copies between device memory and pinned host buffers on a D2H and an H2D stream.

    ``dev`` arguments are flat uint8 views of device memory; ``lo``/``hi`` are byte
    offsets into them. Copy methods return an event that completes with the copy.
    """

    def host_buffer(self, nbytes: int) -> np.ndarray:
        """A pinned host buffer of nbytes (uint8)."""
        raise NotImplementedError

    def start(self) -> None:
        """Make both copy streams wait for the caller's current stream."""
        raise NotImplementedError

    def download(self, host: np.ndarray, dev, lo: int, hi: int):
        """Enqueue host[:] = dev[lo:hi] on the D2H stream; returns its event."""
        raise NotImplementedError

    def upload(self, dev, lo: int, hi: int, host: np.ndarray):
        """Enqueue dev[lo:hi] = host[:] on the H2D stream; returns its event."""
        raise NotImplementedError

    def download_after(self, event) -> None:
        """Make later downloads wait (on the device, not the host) for `event`."""
        raise NotImplementedError

    def wait(self, event) -> None:
        """Block the host until `event` has completed."""
        raise NotImplementedError

    def finish(self) -> None:
        """Block the host until everything enqueued on both streams has completed."""
        raise NotImplementedError

    def byte_view(self, arr):
        """Flat uint8 view of a contiguous array (device or host)."""
        return arr.reshape(-1).view(np.uint8)


class HostCopier(Copier):
    """numpy stand-in for the device: every copy happens at once (the synchronous reference)."""

    def host_buffer(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)

    def start(self) -> None:
        pass

    def download(self, host, dev, lo, hi):
        host[:] = dev[lo:hi]
        return None

    def upload(self, dev, lo, hi, host):
        dev[lo:hi] = host
        return None

    def download_after(self, event) -> None:
        pass

    def wait(self, event) -> None:
        pass

    def finish(self) -> None:
        pass


class CupyCopier(Copier):
    """The CUDA implementation: cudaMemcpyAsync on two non-blocking streams, ordered by events."""

    def __init__(self, cupy, device_id: int):
        self.cp = cupy
        self.device_id = device_id
        with cupy.cuda.Device(device_id):
            self.d2h = cupy.cuda.Stream(non_blocking=True)
            self.h2d = cupy.cuda.Stream(non_blocking=True)

    def _event(self, stream):
        ev = self.cp.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        return ev

    def host_buffer(self, nbytes: int) -> np.ndarray:
        mem = self.cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        return np.frombuffer(mem, np.uint8, nbytes)   # the array keeps `mem` alive

    def start(self) -> None:
        ready = self._event(self.cp.cuda.get_current_stream())
        self.d2h.wait_event(ready)
        self.h2d.wait_event(ready)

    def download(self, host, dev, lo, hi):
        rt = self.cp.cuda.runtime
        if hi > lo:
            rt.memcpyAsync(host.ctypes.data, dev.data.ptr + lo, hi - lo,
                           rt.memcpyDeviceToHost, self.d2h.ptr)
        return self._event(self.d2h)

    def upload(self, dev, lo, hi, host):
        rt = self.cp.cuda.runtime
        if hi > lo:
            rt.memcpyAsync(dev.data.ptr + lo, host.ctypes.data, hi - lo,
                           rt.memcpyHostToDevice, self.h2d.ptr)
        return self._event(self.h2d)

    def download_after(self, event) -> None:
        if event is not None:
            self.d2h.wait_event(event)

    def wait(self, event) -> None:
        if event is not None:
            event.synchronize()

    def finish(self) -> None:
        self.d2h.synchronize()
        self.h2d.synchronize()


def segment_bounds(count: int, itemsize: int, segment_bytes: int) -> list[tuple[int, int]]:
    """(lo, hi) element ranges of at most segment_bytes each (at least one element) covering count.

    Example
    -------
    >>> segment_bounds(10, 4, 16)
    [(0, 4), (4, 8), (8, 10)]
    """
    step = max(1, segment_bytes // max(itemsize, 1))
    return [(lo, min(lo + step, count)) for lo in range(0, count, step)]


class Stager:
    """Pipelined D2H -> host work -> H2D over segments, with a reusable pool of pinned slots.

    Parameters
    ----------
    copier : Copier
    segment_bytes : int
        Bytes per segment (RINGREDUCE_STAGING_BYTES, default 4 MiB).
    slots : int
        Pinned host buffers in rotation (at least 2; 3 lets D2H(k+1), host work on k
        and H2D(k-1) all proceed at once).

    The slots are allocated once (grown when a larger segment is asked for) and
    reused by every later call, so steady state allocates no pinned memory.
    """

    def __init__(self, copier: Copier, segment_bytes: int | None = None, slots: int = DEFAULT_SLOTS):
        if segment_bytes is None:
            segment_bytes = staging_segment_bytes()
        if segment_bytes <= 0 or slots < 2:
            raise ValueError("segment_bytes must be > 0 and slots >= 2")
        self.copier = copier
        self.segment_bytes = segment_bytes
        self.nslots = slots
        self._slots: list[np.ndarray | None] = [None] * slots
        self.allocations = 0    # pinned buffers allocated so far (tests check reuse)

    def _slot(self, s: int, nbytes: int) -> np.ndarray:
        """Slot s with room for nbytes, allocated on first use and grown (never shrunk) after.

        At least segment_bytes, so small calls do not make later ones reallocate;
        a one-segment call (a whole tensor) touches slot 0 only.
        """
        buf = self._slots[s]
        if buf is None or buf.size < nbytes:
            buf = self._slots[s] = self.copier.host_buffer(max(nbytes, self.segment_bytes))
            self.allocations += 1
        return buf

    def run(self, dev, fn, *, download: bool = True, upload: bool = True,
            segment_bytes: int | None = None) -> None:
        """Stage the flat contiguous device array `dev` through the host, segment by segment.

        fn(host_segment, k) is called for k = 0, 1, ... in order with a host array
        of dev's dtype holding segment k (downloaded unless download=False); it
        works in place, and the segment is uploaded back unless upload=False.
        Every rank calls fn for the same segments, so fn may run a collective.
        """
        seg_bytes = self.segment_bytes if segment_bytes is None else segment_bytes
        count, itemsize = dev.size, dev.dtype.itemsize
        bounds = segment_bounds(count, itemsize, seg_bytes)
        if not bounds:
            return
        width = max(hi - lo for lo, hi in bounds) * itemsize
        slots = [self._slot(s, width) for s in range(min(self.nslots, len(bounds)))]
        raw = self.copier.byte_view(dev)
        cp = self.copier
        freed = [None] * self.nslots      # event: the last upload out of this slot has read it
        downloaded = [None] * len(bounds)

        def host(k: int) -> np.ndarray:
            lo, hi = bounds[k]
            return slots[k % self.nslots][:(hi - lo) * itemsize]

        def fetch(k: int) -> None:
            s = k % self.nslots
            cp.download_after(freed[s])
            lo, hi = bounds[k]
            downloaded[k] = cp.download(host(k), raw, lo * itemsize, hi * itemsize)

        cp.start()
        try:
            if download:
                fetch(0)
            for k, (lo, hi) in enumerate(bounds):
                s = k % self.nslots
                if download:
                    if k + 1 < len(bounds):
                        fetch(k + 1)          # overlaps the host work on k below
                    cp.wait(downloaded[k])
                else:
                    cp.wait(freed[s])         # the host is about to write the slot itself
                fn(host(k).view(dev.dtype), k)
                freed[s] = cp.upload(raw, lo * itemsize, hi * itemsize, host(k)) if upload else None
        finally:
            cp.finish()


def stager_for(chan, arr) -> Stager:
    """The channel's Stager for the device holding cupy array `arr` (created on first use).

    It lives in chan.stagers (one per GPU), so its streams and pinned slots are reused by
    every later call on the channel and dropped when the channel is freed.
    """
    import cupy

    dev_id = int(arr.device.id)
    st = chan.stagers.get(dev_id)
    if st is None:
        st = chan.stagers[dev_id] = Stager(CupyCopier(cupy, dev_id))
    return st
