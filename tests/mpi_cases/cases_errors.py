"""Disagreeing ranks and bad input end in RingReduceError on every rank, never a hang."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from _common import everyone, expect_everywhere

import ringreduce as rr

rr.init()
N = rr.size()
R = rr.rank()
multi = pytest.mark.skipif(N < 2, reason="needs two or more ranks to disagree")



@multi
@pytest.mark.parametrize("algorithm", ["auto", "ring", "tree", "mpi", "shm"])
def test_count_mismatch(algorithm):
    x = np.ones(100 + (R == N - 1), dtype=np.float32)
    expect_everywhere(lambda: rr.allreduce(x, algorithm=algorithm, name="w"),
                       "count", "tensor 'w'", f"rank {N - 1}: 101")


@multi
@pytest.mark.parametrize("count", [600, 1000])
def test_count_mismatch_past_the_row(count):
    # The tiny path's second allgather (payloads of 2-4 KiB) must never start when
    # counts differ: the rows show it first. One rank's payload fits the row, the others' do not.
    x = np.ones(count if R == 0 else count + 37, dtype=np.float32)
    expect_everywhere(lambda: rr.allreduce(x, name="w2"), "count", "tensor 'w2'")
    y = rr.allreduce(np.full(count, R, np.float32), op=rr.Sum)    # and the engine goes on
    assert np.all(y == N * (N - 1) // 2)


@multi
@pytest.mark.parametrize("count", [3, 900])
def test_check_off_tiny_path(count, monkeypatch):
    # With the check off, names may differ (no error) but counts still may not on the
    # tiny path: its second allgather would never match, so it raises instead.
    monkeypatch.setenv("RINGREDUCE_CHECK", "0")
    y = rr.allreduce(np.full(count, R, np.float32), op=rr.Sum, name=f"rank-{R}")
    assert np.all(y == N * (N - 1) // 2)
    # (Both sizes on the tiny path: beyond it, with the check off, nothing is checked.)
    x = np.ones(count if R == 0 else count + 100, dtype=np.float32)
    expect_everywhere(lambda: rr.allreduce(x, name="w3"), "count")


@multi
def test_shape_mismatch_same_count():
    x = np.ones((4, 6) if R == 0 else (6, 4), dtype=np.float32)
    expect_everywhere(lambda: rr.allreduce(x, name="grid"), "shape", "(4, 6)", "(6, 4)")


@multi
@pytest.mark.parametrize("count", [3, 100000])
def test_dtype_mismatch(count):
    x = np.ones(count, dtype=np.float32 if R == 0 else np.float64)
    expect_everywhere(lambda: rr.allreduce(x, op=rr.Sum, name="d"), "dtype", "float32", "float64")


@multi
def test_op_mismatch():
    op = rr.Sum if R == 0 else rr.Max
    expect_everywhere(lambda: rr.allreduce(np.ones(10, np.float32), op=op, name="o"), "op",
                       "rr.Sum", "rr.Max")


@multi
def test_name_mismatch():
    expect_everywhere(lambda: rr.allreduce(np.ones(10, np.float32), name=f"layer{R % 2}"), "name")


@multi
def test_algorithm_mismatch():
    algo = "ring" if R == 0 else "tree"
    expect_everywhere(lambda: rr.allreduce(np.ones(1000, np.float32), algorithm=algo), "algorithm")


@multi
def test_broadcast_root_mismatch():
    expect_everywhere(lambda: rr.broadcast_(np.ones(8), root_rank=R % 2, name="b"), "op")


@multi
def test_collective_kind_mismatch():
    def call():
        if R == 0:
            rr.broadcast_(np.ones(8, np.float32), name="k")
        else:
            rr.allreduce(np.ones(8, np.float32), name="k")
    expect_everywhere(call, "collective")


def test_engine_usable_after_mismatch():
    y = rr.allreduce(np.ones(5, np.float32), op=rr.Sum, name="after")
    assert everyone(np.all(y == N))


@pytest.mark.parametrize("bad, pattern", [
    (np.ones(4, dtype=np.complex64), "unsupported dtype complex64"),
    (np.array([1, "a"], dtype=object), "unsupported dtype object"),
    ([1.0, 2.0], "must be a numpy"),
])
def test_bad_input(bad, pattern):
    expect_everywhere(lambda: rr.allreduce(bad, name="bad"), pattern, "tensor 'bad'")


def test_inplace_needs_writable_contiguous():
    ro = np.ones(10, np.float32)
    ro.flags.writeable = False
    expect_everywhere(lambda: rr.allreduce_(ro), "read-only")
    strided = np.ones(20, np.float32)[::2]
    expect_everywhere(lambda: rr.allreduce_(strided), "not C-contiguous")


def test_out_must_match():
    x = np.ones(10, np.float32)
    expect_everywhere(lambda: rr.allreduce(x, out=np.empty(11, np.float32)), "shape (11,)")
    expect_everywhere(lambda: rr.allreduce(x, out=np.empty(10, np.float64)), "dtype float64")


def test_average_on_integers():
    expect_everywhere(lambda: rr.allreduce(np.ones(3, np.int32), op=rr.Average, name="i"),
                       "Average on integer", "int32")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_native_mpi_rejects_half(dtype):
    expect_everywhere(lambda: rr.allreduce(np.ones(3, dtype), algorithm="mpi"), "half types")


def test_auto_never_picks_native_for_half():
    for count in (1, 100, 100000):
        y = rr.allreduce(np.ones(count, np.float16), op=rr.Sum)
        assert everyone(np.all(y == N))


def test_unknown_algorithm_and_op():
    expect_everywhere(lambda: rr.allreduce(np.ones(3), algorithm="butterfly"), "unknown algorithm")
    expect_everywhere(lambda: rr.allreduce(np.ones(3), op=17), "unknown reduction op")


def test_bad_root():
    expect_everywhere(lambda: rr.broadcast_(np.ones(3), root_rank=N), "out of range")


def test_init_is_idempotent_and_rejects_other_comm():
    from mpi4py import MPI
    rr.init()
    rr.init(MPI.COMM_WORLD)
    other = MPI.COMM_WORLD.Split(0 if R == 0 else 1, R) if N > 1 else MPI.COMM_SELF.Dup()
    if N > 1:
        expect_everywhere(lambda: rr.init(other), "already initialised")
    other.Free()


@pytest.mark.skipif(N < 3, reason="needs a sub-communicator that renumbers ranks")
def test_sub_communicator_errors_say_which_numbering():
    from mpi4py import MPI
    sub = MPI.COMM_WORLD.Split(0 if R == 0 else 1, N - R)      # reversed: sub ranks differ
    try:
        if R == 0:
            return
        me = sub.Get_rank()
        with pytest.raises(rr.RingReduceError) as info:
            rr.allreduce(np.ones(4, np.int32 if me == 0 else np.float32), name="sub.w", comm=sub)
        assert f"rank {me} of the sub-communicator (world rank {R})" in str(info.value), str(info.value)
    finally:
        sub.Free()


@multi
@pytest.mark.parametrize("rows_over", ["shared memory", "MPI"])
def test_agreement_rows_over_shared_memory_and_mpi(rows_over, monkeypatch):
    # Ranks on one node exchange the check's rows through a shared window; ranks on
    # different nodes (here: node ids that say so) through Iallgather. Both give the
    # same results and the same named errors, on every path (tiny, fast, general).
    from mpi4py import MPI

    from ringreduce.runtime.context import context

    if rows_over == "MPI":
        monkeypatch.setenv("RINGREDUCE_NODE_ID", f"node{R}")
    comm = MPI.COMM_WORLD.Dup()
    try:
        ctx = context(comm)
        monkeypatch.delenv("RINGREDUCE_NODE_ID", raising=False)
        assert (ctx.main.rows is not None and ctx.main.rows.window is not None) == (rows_over == "shared memory")
        for count in (3, 700, 5000, 300000):          # tiny, tiny with a tail, fast, large
            y = rr.allreduce(np.full(count, R, np.float32), op=rr.Sum, name="r", comm=comm)
            assert np.all(y == N * (N - 1) // 2), count
            x = np.ones(count + (R == N - 1), np.float32)
            _raises_everywhere(lambda x=x: rr.allreduce(x, name="w", comm=comm), "count", f"rank {N - 1}")
            _raises_everywhere(
                lambda x=x, count=count: rr.allreduce(x[:count], name="w", comm=comm,
                                                      algorithm="ring" if R else "tree"),
                "algorithm")
        if R == 0:
            bad = lambda: rr.broadcast_object("a", root_rank=0, comm=comm)
        else:
            bad = lambda: rr.allreduce(np.ones(3, np.float32), name="w", comm=comm)
        _raises_everywhere(bad, "collective")
        got = rr.allgather_object(R, comm=comm)
        assert got == list(range(N))
    finally:
        comm.Free()


@multi
@pytest.mark.parametrize("count", [3, 700, 5000])
def test_shared_rows_with_a_late_rank(count):
    # The C++ handshake polls a few microseconds, then the supervised wait takes over:
    # a rank that arrives milliseconds late (each rank in turn) still meets the same
    # call, and an in-place call that fails the check leaves its input untouched.
    import time

    for late in range(N):
        if R == late:
            time.sleep(0.02)
        y = rr.allreduce(np.full(count, R + late, np.float32), op=rr.Sum, name="late")
        assert np.all(y == N * (N - 1) // 2 + N * late), (count, late)
    x = np.full(count, 7, np.float32)
    if R == 0:
        time.sleep(0.02)
    expect_everywhere(lambda: rr.allreduce_(x, op=rr.Sum if R else rr.Max, name="late"), "op")
    assert np.all(x == 7)


@multi
def test_shared_rows_python_and_cpp_handshakes_meet():
    # Rank 0 makes the rows' handshake in Python (as without the C++ extension), the
    # others in C++ (_C.flags_arrive, fused into the tiny and fast paths): the same
    # flags and rows, so every path still agrees, and a mismatch still names the field.
    from mpi4py import MPI

    from ringreduce.runtime import agree
    from ringreduce.runtime.context import context

    comm = MPI.COMM_WORLD.Dup()
    try:
        rows = agree.rows_of(context(comm).main)
        if rows.window is None:
            pytest.skip("the ranks do not share a node")
        if R == 0:
            rows.window.arrive = None
        for count in (3, 700, 5000, 300000):          # tiny, tiny, fast, fast (larger)
            for algorithm in ("auto", "mpi", "shm"):
                y = rr.allreduce(np.full(count, R + 1, np.float32), op=rr.Sum, name="pc",
                                 algorithm=algorithm, comm=comm)
                assert np.all(y == N * (N + 1) // 2), (count, algorithm)
            x = np.ones(count + (R == N - 1), np.float32)
            _raises_everywhere(lambda x=x: rr.allreduce(x, name="pc", comm=comm), "count", f"rank {N - 1}")
        assert rr.allgather_object(R, comm=comm) == list(range(N))
    finally:
        comm.Free()


@multi
@pytest.mark.parametrize("early_max", ["default", "any size"])
@pytest.mark.parametrize("algorithm", ["ring", "tree"])
def test_first_segment_sent_before_agreeing(algorithm, early_max, monkeypatch):
    # Across nodes the ring's and the tree's first segment leaves while the fingerprints
    # travel; on a mismatch that segment is consumed (waited, truncated, probed or
    # cancelled) so no later call can receive it: each mismatch below is followed by a
    # checked call whose values differ from every earlier one. At 3 and 5 ranks the
    # tree folds: a folded rank sends early, its neighbour only receives, and a rank
    # whose first partner folds sends nothing early. By default only first segments up to
    # agree.EARLY_MAX_BYTES go early (here 1000 elements do, 300000 do not, and a count
    # mismatch may pair an early sender with a rank that is not one); "any size" sends
    # every first segment early, several segments per message included.
    from mpi4py import MPI

    from ringreduce.runtime import agree
    from ringreduce.runtime.context import context

    if early_max != "default":
        monkeypatch.setattr(agree, "EARLY_MAX_BYTES", 1 << 40)
    monkeypatch.setenv("RINGREDUCE_NODE_ID", f"node{R}")
    comm = MPI.COMM_WORLD.Dup()
    try:
        ctx = context(comm)
        monkeypatch.delenv("RINGREDUCE_NODE_ID", raising=False)
        assert agree.rows_of(ctx.main).overlaps
        calls = iter(range(1, 1000))

        def checked(count, strided=False):
            v = next(calls)
            base = np.full(2 * count, v * (R + 1), np.float32)
            x = base[::2] if strided and R == 0 else base[:count]     # general path on rank 0
            y = rr.allreduce(x, op=rr.Sum, algorithm=algorithm, name="c", comm=comm)
            assert np.all(y == v * N * (N + 1) // 2), (count, v)

        for count in (0, 1000, 300000):               # nothing to send, one segment, several
            checked(count)
            checked(count, strided=True)
        y = rr.allreduce(np.full(5000, R + 1, np.float32), op=rr.Sum, algorithm=algorithm, name="c",
                         comm=comm, prescale_factor=2.0)
        assert np.all(y == N * (N + 1))

        def ring(count, **kw):          # a call of the algorithm under test, unless kw says otherwise
            kw = {"algorithm": algorithm, "name": "w", "comm": comm, **kw}
            return lambda: rr.allreduce(np.ones(count, np.float32), **kw)
        other = "tree" if algorithm == "ring" else "ring"
        last = R == N - 1
        for count in (1000, 300000):
            cases = [
                (ring(count + (1000 if last else 0)), "count"),          # longer first segment
                (ring(count * 100 if last else count), "count"),         # early on one side only
                (ring(0 if last else count), "count"),                  # one rank sends nothing
                (ring(count, algorithm="mpi") if last else ring(count), "algorithm"),   # probed
                (ring(count, algorithm=other) if last else ring(count), "algorithm"),
                (ring(count, algorithm=other) if R % 2 else ring(count), "algorithm"),  # half and half
                (ring(count, op=rr.Max) if last else ring(count), "op"),
                (lambda c=count: rr.allreduce(np.ones(c, np.int32), comm=comm, name="w") if last
                 else ring(c)(), "rejected"),                           # an error row on one rank
            ]
            for fn, field in cases:
                _raises_everywhere(fn, field)
                checked(count)
    finally:
        comm.Free()


@multi
@pytest.mark.parametrize("count", [1000, 16384])
@pytest.mark.parametrize("route", ["fast", "general on rank 0"])
def test_shm_fingerprint_in_band(count, route):
    # Up to 64 KiB, shm's data and fingerprint share one barrier: nobody reads a peer's
    # slot before every row matched. Rank 0 may take the general path (a strided input)
    # while the others take the fast one: the same in-band call either way.
    def make(n, value):
        base = np.full(2 * n, value, np.float32)
        return base[::2] if (route != "fast" and R == 0) else base[:n]
    rr.allreduce(np.ones(1 << 16, np.float32), algorithm="shm", name="warm")   # the window holds it
    for _ in range(3):
        y = rr.allreduce(make(count, R), op=rr.Sum, algorithm="shm", name="s")
        assert np.all(y == N * (N - 1) // 2)
    expect_everywhere(lambda: rr.allreduce(make(count + (R == N - 1), 1), algorithm="shm", name="s"),
                      "count", f"rank {N - 1}: {count + 1}")
    expect_everywhere(lambda: rr.allreduce(make(count, 1), algorithm="shm", name=f"s{R}"), "name")
    expect_everywhere(lambda: rr.allreduce(make(count, 1), algorithm="shm" if R else "tree", name="s"),
                      "algorithm")
    y = rr.allreduce(make(count, R), op=rr.Max, algorithm="shm", name="s")   # in step afterwards
    assert np.all(y == N - 1)



def _raises_everywhere(fn, *patterns) -> None:
    expect_everywhere(fn, *patterns, who=f"rank {R} of the sub-communicator (world rank {R})")
