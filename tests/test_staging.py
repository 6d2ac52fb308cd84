"""The pinned-staging pipeline and device-mode logic, tested on the CPU.

numpy buffers stand in for device memory. `SimCopier` simulates CUDA streams
adversarially: copies sit in per-stream queues and run only when the policy lets
them (eagerly, or as late as anything forces them), so a missing event wait in
the schedule shows up as wrong bytes, not as a lucky pass.
"""
from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from ringreduce.core import device
from ringreduce.core.errors import RingReduceError
from ringreduce.transport.staging import Copier, HostCopier, Stager, segment_bounds


class _Event:
    def __init__(self, stream, pos):
        self.stream, self.pos = stream, pos

    def done(self) -> bool:
        return self.stream.done >= self.pos


class _Stream:
    def __init__(self, name):
        self.name, self.ops, self.done = name, [], 0

    def pending(self) -> int:
        return len(self.ops) - self.done


class SimCopier(Copier):
    """Simulated CUDA streams ("user", "d2h", "h2d") with a scheduling policy.

    policy maps a stream name to "eager" (runs whenever nothing blocks it) or
    "lazy" (runs only when the host or another stream's wait forces it).
    Every call is logged as (what, byte offset) for the ordering checks.
    """

    def __init__(self, policy: dict):
        self.policy = policy
        self.streams = {n: _Stream(n) for n in ("user", "d2h", "h2d")}
        self.log: list[tuple[str, int]] = []
        self.upload_events: set[int] = set()
        self.host_waits_on_upload = 0

    # -- the simulator
    def _enqueue(self, name, op) -> _Event:
        s = self.streams[name]
        s.ops.append(op)
        ev = _Event(s, len(s.ops))
        self._advance_eager()
        return ev

    def _step(self, s: _Stream, force: bool) -> bool:
        kind, arg = s.ops[s.done]
        if kind == "wait" and not arg.done():
            if not force:
                return False
            self._force(arg)
        if kind == "copy":
            arg()
        s.done += 1
        return True

    def _force(self, ev: _Event) -> None:
        while not ev.done():
            self._step(ev.stream, force=True)

    def _advance_eager(self) -> None:
        moved = True
        while moved:
            moved = False
            for s in self.streams.values():
                if self.policy.get(s.name) == "eager" and s.pending() and self._step(s, force=False):
                    moved = True

    def user_write(self, dev: np.ndarray, values: np.ndarray) -> None:
        """A pending 'kernel' on the caller's stream that writes dev (runs only when forced)."""
        self._enqueue("user", ("copy", lambda: dev.__setitem__(slice(None), values)))

    def pending(self) -> int:
        """Copies not yet done (the caller's own stream is not the stager's business)."""
        return self.streams["d2h"].pending() + self.streams["h2d"].pending()

    # -- the Copier interface
    def host_buffer(self, nbytes):
        return np.full(nbytes, 0xAB, np.uint8)   # garbage, so a missed copy shows

    def start(self):
        s = self.streams["user"]
        ready = _Event(s, len(s.ops))
        self._enqueue("d2h", ("wait", ready))
        self._enqueue("h2d", ("wait", ready))
        self.log.append(("start", 0))

    def download(self, host, dev, lo, hi):
        self.log.append(("D2H", lo))
        return self._enqueue("d2h", ("copy", lambda: host.__setitem__(slice(None), dev[lo:hi])))

    def upload(self, dev, lo, hi, host):
        self.log.append(("H2D", lo))
        ev = self._enqueue("h2d", ("copy", lambda: dev.__setitem__(slice(lo, hi), host)))
        self.upload_events.add(id(ev))
        return ev

    def download_after(self, event):
        if event is not None:
            self._enqueue("d2h", ("wait", event))

    def wait(self, event):
        if event is not None:
            if id(event) in self.upload_events:
                self.host_waits_on_upload += 1
            self._force(event)

    def finish(self):
        for s in (self.streams["d2h"], self.streams["h2d"]):
            while s.pending():
                self._step(s, force=True)
        self.log.append(("finish", 0))


POLICIES = {
    "all-lazy": {},
    "all-eager": {"user": "eager", "d2h": "eager", "h2d": "eager"},
    "d2h-eager": {"d2h": "eager"},            # downloads race ahead of uploads (slot reuse)
    "h2d-eager": {"h2d": "eager"},
}
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.int8]


def _host_op(host, k):
    """What the host does to segment k (a stand-in for the allreduce): x*3 + k."""
    host[...] = (host.astype(np.float64) * 3 + k).astype(host.dtype)


def _expected(x, bounds):
    want = x.copy()
    for k, (lo, hi) in enumerate(bounds):
        _host_op(want[lo:hi], k)
    return want


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("count", [0, 1, 5, 64, 257])
@pytest.mark.parametrize("slots", [2, 3])
def test_pipeline_result_under_adversarial_streams(policy, dtype, count, slots):
    rng = np.random.default_rng(count)
    x = (rng.standard_normal(count) * 10).astype(dtype)
    dev = np.zeros(count, dtype)                 # stale until the user's kernel runs
    sim = SimCopier(POLICIES[policy])
    sim.user_write(dev, x)
    st = Stager(sim, segment_bytes=24, slots=slots)
    bounds = segment_bounds(count, np.dtype(dtype).itemsize, 24)
    st.run(dev, _host_op)
    assert sim.pending() == 0, "run returned with copies still queued"
    np.testing.assert_array_equal(dev.view(np.uint8), _expected(x, bounds).view(np.uint8))


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_receive_only_waits_before_host_rewrites_a_slot(policy):
    # Broadcast receivers: nothing downloaded, the host writes each slot, then it goes up.
    count = 100
    dev = np.zeros(count, np.float32)
    sim = SimCopier(POLICIES[policy])
    st = Stager(sim, segment_bytes=16, slots=2)
    st.run(dev, lambda host, k: host.__setitem__(slice(None), k + 1), download=False)
    assert sim.pending() == 0
    want = np.repeat(np.arange(1, 26, dtype=np.float32), 4)
    np.testing.assert_array_equal(dev, want)


def test_send_only_uploads_nothing():
    dev = np.arange(50, dtype=np.float32)
    seen = []
    sim = SimCopier(POLICIES["all-lazy"])
    Stager(sim, segment_bytes=40, slots=3).run(dev, lambda h, k: seen.append(h.copy()), upload=False)
    assert not any(what == "H2D" for what, _ in sim.log)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(50, dtype=np.float32))


def test_schedule_overlaps_neighbour_copies_with_host_work():
    count, seg = 40, 16          # float32: 4 elements per segment, 10 segments
    dev = np.arange(count, dtype=np.float32)
    sim = SimCopier(POLICIES["all-lazy"])
    order = []

    def host_op(h, k):
        order.append(len(sim.log))
        sim.log.append(("host", k))

    Stager(sim, segment_bytes=seg, slots=3).run(dev, host_op)
    log = sim.log
    pos = {entry: i for i, entry in enumerate(log)}
    nseg = count * 4 // seg
    for k in range(nseg):
        here = pos[("host", k)]
        if k + 1 < nseg:   # D2H of k+1 already enqueued when the host starts on k
            assert pos[("D2H", (k + 1) * seg)] < here
        if k >= 1:         # H2D of k-1 enqueued (and not waited for) before the host starts on k
            assert pos[("H2D", (k - 1) * seg)] < here
        assert pos[("H2D", k * seg)] > here
        assert pos[("D2H", k * seg)] < here
    # The host never blocks on an upload inside the loop: only finish() waits for them.
    assert sim.host_waits_on_upload == 0
    assert log[0] == ("start", 0) and log[-1] == ("finish", 0)


def test_segments_cover_buffer_element_aligned():
    for count, itemsize, seg in [(0, 4, 16), (1, 8, 4), (10, 2, 7), (1000, 4, 4096), (9, 1, 3)]:
        b = segment_bounds(count, itemsize, seg)
        starts, ends = [lo for lo, _ in b], [hi for _, hi in b]
        assert starts == [0] + ends[:-1] if b else count == 0     # contiguous, from 0
        assert (ends[-1] if b else 0) == count
        assert all(0 < (hi - lo) * itemsize <= max(seg, itemsize) for lo, hi in b)


def test_pool_reuses_pinned_slots():
    st = Stager(HostCopier(), segment_bytes=1024, slots=3)
    x = np.ones(1000, np.float32)
    st.run(x, _host_op)
    assert st.allocations == 3
    first = [b.ctypes.data for b in st._slots]
    for n in (1000, 10, 256, 3):
        st.run(np.ones(n, np.float32), _host_op)
        st.run(np.ones(n, np.float64), _host_op)
    assert st.allocations == 3 and [b.ctypes.data for b in st._slots] == first
    # A whole tensor in one segment (the compressed path) grows slot 0 alone, once.
    st.run(np.ones(2000, np.float32), _host_op, segment_bytes=8000)
    st.run(np.ones(2000, np.float32), _host_op, segment_bytes=8000)
    assert st.allocations == 4 and [b.ctypes.data for b in st._slots][1:] == first[1:]
    st.run(np.ones(1000, np.float32), _host_op)
    assert st.allocations == 4


def test_exception_in_host_work_still_drains_streams():
    sim = SimCopier(POLICIES["all-lazy"])
    dev = np.arange(64, dtype=np.float32)

    def boom(h, k):
        if k == 2:
            raise RingReduceError("rank 0: peer failed")
        h += 1

    with pytest.raises(RingReduceError):
        Stager(sim, segment_bytes=16).run(dev, boom)
    assert sim.pending() == 0


# ---- device mode detection --------------------------------------------------

def test_env_override_and_library_query():
    def never(*_):
        raise AssertionError("the override must not query the library")

    assert device.detect({"RINGREDUCE_CUDA_AWARE": "1"}, query=never).aware
    assert device.detect({"RINGREDUCE_CUDA_AWARE": "off"}, query=never).name == "staged"
    assert device.detect({}, query=lambda: (True, "lib says yes")).as_dict() == \
        {"mode": "cuda-aware", "reason": "lib says yes"}
    unknown = device.detect({}, query=lambda: (None, "no query"))
    assert not unknown.aware and "RINGREDUCE_CUDA_AWARE=1" in unknown.reason
    with pytest.raises(RingReduceError, match="RINGREDUCE_CUDA_AWARE"):
        device.detect({"RINGREDUCE_CUDA_AWARE": "maybe"}, query=never)


def test_query_this_mpi():
    from mpi4py import MPI

    answer, how = device.query_library()
    if MPI.get_vendor()[0] == "Open MPI":
        # Open MPI always exports the query; the PyPI wheel is built --without-cuda.
        assert "MPIX_Query_cuda_support" in how and answer in (True, False)
    assert isinstance(how, str) and how


def test_host_arrays_are_not_device_arrays():
    assert not device.is_device_array(np.zeros(2))
    assert not device.is_device_array([1, 2])
    assert device.array_module(np.zeros(2)) is np
    device.synchronize(np.zeros(2))   # a no-op for host arrays, cupy or not


def test_import_and_host_collectives_never_import_cupy():
    code = ("import sys, numpy as np, ringreduce as rr; rr.init(); "
            "y = rr.allreduce(np.ones(5, np.float32)); rr.broadcast_(y); rr.info(); "
            "assert 'cupy' not in sys.modules, 'cupy was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr
