"""torch.distributed on the "ringreduce" backend, every rank runs these (tests/test_backend.py).

The default group is ringreduce's, initialised the usual way (tcp:// init, so torch
has a shared store); a gloo group over the same ranks is the reference: every
collective runs on both with the same inputs and must give the same tensors.
Inputs are small integers in every dtype, so each reduction is exact whatever the
order of summation, and results must also be bit-identical across ranks. Where
gloo lacks a collective or a dtype (it says so), the expected tensor is computed
on every rank from what every rank sends.
"""
from __future__ import annotations

import socket
import warnings

import pytest
import torch
import torch.distributed as dist

import ringreduce as rr
import ringreduce.torch as rrt  # registers the "ringreduce" backend
from ringreduce.core.mpi import MPI

warnings.filterwarnings("ignore", category=FutureWarning)   # torch's renamed collectives
rr.init()
R, N = rr.rank(), rr.size()
torch.set_num_threads(1)


def _port() -> int:
    port = None
    if R == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return MPI.COMM_WORLD.bcast(port, 0)


dist.init_process_group("ringreduce", init_method=f"tcp://127.0.0.1:{_port()}", rank=R, world_size=N)
GLOO = dist.new_group(backend="gloo")
EVENS = [r for r in range(N) if r % 2 == 0]
SUB = dist.new_group(EVENS)                      # every rank calls new_group, as torch requires
SUB_GLOO = dist.new_group(EVENS, backend="gloo")
GROUPS = {"world": (None, GLOO, list(range(N))), "evens": (SUB, SUB_GLOO, EVENS)}
# For comparing bytes across a group's ranks, independently of the backend under test.
_MPI_OF = {tuple(range(N)): MPI.COMM_WORLD,
           tuple(EVENS): MPI.COMM_WORLD.Split(0 if R in EVENS else MPI.UNDEFINED, R)}

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]
OPS = {"sum": dist.ReduceOp.SUM, "product": dist.ReduceOp.PRODUCT, "min": dist.ReduceOp.MIN,
       "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG}


def data(rank: int, n: int, dtype, salt: int = 0) -> torch.Tensor:
    """What `rank` sends: small integers (exact in every dtype, and in products of few ranks)."""
    v = (torch.arange(n, dtype=torch.int64) * (rank + 3) + salt + rank) % 5 - 2
    if dtype != torch.int64:
        v = torch.where(v == 0, torch.ones_like(v), v)     # no zeros: products stay informative
    return v.to(dtype)


def member(group_key) -> bool:
    return R in GROUPS[group_key][2]


def same_everywhere(t: torch.Tensor, ranks) -> None:
    """The tensor's bytes are equal on every rank of the group (checked over MPI)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    every = _MPI_OF[tuple(ranks)].allgather(raw)
    assert all(e == every[0] for e in every), f"rank {R}: result differs across ranks"


def gloo_or(local, run_gloo):
    """gloo's answer, or the locally computed one where gloo does not support the call."""
    try:
        return run_gloo()
    except (RuntimeError, ValueError) as exc:
        text = str(exc).lower()
        if "support" in text or "unsupported" in text or "not implemented" in text:
            return local()
        raise


def reduce_local(op_key, parts):
    out = parts[0].clone()
    for p in parts[1:]:
        if op_key in ("sum", "avg"):
            out = out + p
        elif op_key == "product":
            out = out * p
        elif op_key == "min":
            out = torch.minimum(out, p)
        else:
            out = torch.maximum(out, p)
    return out / len(parts) if op_key == "avg" else out


def skip_unsupported(dtype, op_key=None):
    if op_key == "avg" and dtype == torch.int64:
        pytest.skip("AVG of integers: ringreduce refuses it (it would truncate), gloo has no AVG")


# ------------------------------------------------------------------ all_reduce
@pytest.mark.parametrize("async_op", [False, True])
@pytest.mark.parametrize("op_key", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gk", list(GROUPS))
def test_all_reduce(gk, dtype, op_key, async_op):
    skip_unsupported(dtype, op_key)
    if not member(gk):
        return
    ours_g, gloo_g, ranks = GROUPS[gk]
    t = data(R, 11, dtype)
    w = dist.all_reduce(t, op=OPS[op_key], group=ours_g, async_op=async_op)
    if async_op:
        assert w.wait() is not False
        assert w.get_future().value()[0] is t
    parts = [data(r, 11, dtype) for r in ranks]

    def by_gloo():
        ref = data(R, 11, dtype)
        if op_key == "avg":               # gloo has no AVG: its SUM, divided
            dist.all_reduce(ref, op=dist.ReduceOp.SUM, group=gloo_g)
            return ref / len(ranks)
        dist.all_reduce(ref, op=OPS[op_key], group=gloo_g)
        return ref

    expect = gloo_or(lambda: reduce_local(op_key, parts), by_gloo)
    torch.testing.assert_close(t, expect.to(dtype), rtol=0, atol=0)
    same_everywhere(t, ranks)


def test_all_reduce_premul_sum():
    t = data(R, 8, torch.float32)
    dist.all_reduce(t, op=dist._make_nccl_premul_sum(0.5))
    expect = reduce_local("sum", [data(r, 8, torch.float32) for r in range(N)]) * 0.5
    torch.testing.assert_close(t, expect, rtol=0, atol=0)


def test_all_reduce_coalesced_and_empty():
    ts = [data(R, 5, torch.float32), data(R, 0, torch.float32), data(R, 3, torch.float32, 1)]
    dist.all_reduce_coalesced(ts)
    for i, (n, dt, salt) in enumerate([(5, torch.float32, 0), (0, torch.float32, 0),
                                       (3, torch.float32, 1)]):
        expect = reduce_local("sum", [data(r, n, dt, salt) for r in range(N)])
        torch.testing.assert_close(ts[i], expect, rtol=0, atol=0)


def test_all_reduce_large_goes_through_the_algorithms():
    t = data(R, 300_000, torch.float32)
    dist.all_reduce(t)
    expect = reduce_local("sum", [data(r, 300_000, torch.float32) for r in range(N)])
    torch.testing.assert_close(t, expect, rtol=0, atol=0)
    same_everywhere(t, list(range(N)))


# ------------------------------------------------------------------- broadcast
@pytest.mark.parametrize("dtype", DTYPES + [torch.bool, torch.uint8])
@pytest.mark.parametrize("gk", list(GROUPS))
def test_broadcast(gk, dtype):
    if not member(gk):
        return
    ours_g, gloo_g, ranks = GROUPS[gk]
    root = ranks[-1]
    t = data(R, 9, dtype) if dtype != torch.bool else data(R, 9, torch.int64) > 0
    dist.broadcast(t, src=root, group=ours_g)
    expect = data(root, 9, dtype) if dtype != torch.bool else data(root, 9, torch.int64) > 0
    assert torch.equal(t, expect)


def test_broadcast_object_list():
    objs = [{"rank": R, "x": [1, 2]}, "hello"] if R == 0 else [None, None]
    dist.broadcast_object_list(objs, src=0)
    assert objs == [{"rank": 0, "x": [1, 2]}, "hello"]


# ------------------------------------------------------------------- allgather
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gk", list(GROUPS))
def test_all_gather(gk, dtype):
    if not member(gk):
        return
    ours_g, gloo_g, ranks = GROUPS[gk]
    outs = [torch.empty(2, 3, dtype=dtype) for _ in ranks]
    dist.all_gather(outs, data(R, 6, dtype).reshape(2, 3), group=ours_g)
    ref = [torch.empty(2, 3, dtype=dtype) for _ in ranks]
    expect = gloo_or(lambda: [data(r, 6, dtype).reshape(2, 3) for r in ranks],
                     lambda: (dist.all_gather(ref, data(R, 6, dtype).reshape(2, 3), group=gloo_g), ref)[1])
    for o, e in zip(outs, expect):
        assert torch.equal(o, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gk", list(GROUPS))
def test_all_gather_into_tensor(gk, dtype):
    if not member(gk):
        return
    ours_g, gloo_g, ranks = GROUPS[gk]
    out = torch.empty(len(ranks) * 4, dtype=dtype)
    dist.all_gather_into_tensor(out, data(R, 4, dtype), group=ours_g)
    ref = torch.empty_like(out)
    expect = gloo_or(lambda: torch.cat([data(r, 4, dtype) for r in ranks]),
                     lambda: (dist.all_gather_into_tensor(ref, data(R, 4, dtype), group=gloo_g), ref)[1])
    assert torch.equal(out, expect)


def test_all_gather_object():
    got = [None] * N
    dist.all_gather_object(got, {"r": R, "pad": "x" * R})
    assert got == [{"r": r, "pad": "x" * r} for r in range(N)]


# --------------------------------------------------------------- reduce-scatter
@pytest.mark.parametrize("op_key", ["sum", "avg", "max"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gk", list(GROUPS))
def test_reduce_scatter_tensor(gk, dtype, op_key):
    skip_unsupported(dtype, op_key)
    if not member(gk):
        return
    ours_g, gloo_g, ranks = GROUPS[gk]
    n = len(ranks)
    out = torch.empty(3, dtype=dtype)
    dist.reduce_scatter_tensor(out, data(R, 3 * n, dtype), op=OPS[op_key], group=ours_g)
    me = ranks.index(R)
    expect = reduce_local(op_key, [data(r, 3 * n, dtype) for r in ranks])[3 * me:3 * me + 3]
    torch.testing.assert_close(out, expect.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scatter_list_uneven(dtype):
    # piece i has i + 1 elements: uneven across ranks, the same layout everywhere
    inputs = [data(R, i + 1, dtype, salt=i) for i in range(N)]
    out = torch.empty(R + 1, dtype=dtype)
    dist.reduce_scatter(out, inputs)
    expect = reduce_local("sum", [data(r, R + 1, dtype, salt=R) for r in range(N)])
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


# ------------------------------------------------------------------ all-to-all
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gk", list(GROUPS))
def test_all_to_all_single_with_splits(gk, dtype):
    if not member(gk):
        return
    ours_g, gloo_g, ranks = GROUPS[gk]
    me = ranks.index(R)
    rows = lambda src, dst: (src + dst) % 3 + 1          # rows rank src sends to rank dst
    send = [rows(me, j) for j in range(len(ranks))]
    recv = [rows(j, me) for j in range(len(ranks))]
    x = data(R, 2 * sum(send), dtype).reshape(-1, 2)
    out = torch.empty(sum(recv), 2, dtype=dtype)
    dist.all_to_all_single(out, x, recv, send, group=ours_g)
    ref = torch.empty_like(out)
    expect = gloo_or(lambda: None,
                     lambda: (dist.all_to_all_single(ref, x, recv, send, group=gloo_g), ref)[1])
    if expect is None:     # gloo lacks it: rebuild from what each rank sends
        pieces = []
        for j, r in enumerate(ranks):
            their = [rows(j, k) for k in range(len(ranks))]
            xj = data(r, 2 * sum(their), dtype).reshape(-1, 2)
            pieces.append(xj[sum(their[:me]):sum(their[:me + 1])])
        expect = torch.cat(pieces)
    assert torch.equal(out, expect)


def test_all_to_all_single_even():
    x = torch.arange(N * 2, dtype=torch.float32) + 100 * R
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    expect = torch.cat([torch.arange(2 * R, 2 * R + 2, dtype=torch.float32) + 100 * r
                        for r in range(N)])
    assert torch.equal(out, expect)


def test_all_to_all_list():
    inputs = [torch.full((j + 1,), float(10 * R + j)) for j in range(N)]
    outputs = [torch.empty(R + 1) for _ in range(N)]
    dist.all_to_all(outputs, inputs)
    for j, o in enumerate(outputs):
        assert torch.equal(o, torch.full((R + 1,), float(10 * j + R)))


# ------------------------------------------- reduce, gather, scatter, barrier
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce(dtype):
    root = N - 1
    t = data(R, 7, dtype)
    dist.reduce(t, dst=root)
    if R == root:
        expect = reduce_local("sum", [data(r, 7, dtype) for r in range(N)])
        torch.testing.assert_close(t, expect, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather(dtype):
    root = 0
    outs = [torch.empty(5, dtype=dtype) for _ in range(N)] if R == root else None
    dist.gather(data(R, 5, dtype), outs, dst=root)
    if R == root:
        for r, o in enumerate(outs):
            assert torch.equal(o, data(r, 5, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter(dtype):
    root = N - 1
    ins = [data(r, 4, dtype, salt=7) for r in range(N)] if R == root else None
    out = torch.empty(4, dtype=dtype)
    dist.scatter(out, ins, src=root)
    assert torch.equal(out, data(R, 4, dtype, salt=7))


def test_barrier_and_monitored_order():
    for _ in range(3):
        dist.barrier()
    w = dist.barrier(async_op=True)
    w.wait()


# -------------------------------------------------------------- point-to-point
def test_send_recv_ring():
    if N == 1:
        return
    right, left = (R + 1) % N, (R - 1) % N
    got = torch.empty(6, dtype=torch.float64)
    reqs = [dist.isend(data(R, 6, torch.float64), right, tag=3), dist.irecv(got, left, tag=3)]
    for w in reqs:
        w.wait()
    assert torch.equal(got, data(left, 6, torch.float64))


def test_send_recv_blocking_and_batch():
    if N == 1:
        return
    if R == 0:
        for dst in range(1, N):
            dist.send(torch.full((3,), float(dst)), dst)
    else:
        t = torch.empty(3)
        dist.recv(t, 0)
        assert torch.equal(t, torch.full((3,), float(R)))
    right, left = (R + 1) % N, (R - 1) % N
    got = torch.empty(4, dtype=torch.int64)
    ops = [dist.P2POp(dist.isend, data(R, 4, torch.int64), right),
           dist.P2POp(dist.irecv, got, left)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    assert torch.equal(got, data(left, 4, torch.int64))


def test_send_does_not_block_later_collectives():
    # gloo semantics: an isend is posted at once, so a collective issued after it still runs
    if N == 1:
        return
    if R == 0:
        w = dist.isend(torch.ones(5), 1, tag=9)
        t = torch.ones(2)
        dist.all_reduce(t)
        w.wait()
    else:
        t = torch.ones(2)
        dist.all_reduce(t)
        if R == 1:
            got = torch.empty(5)
            dist.recv(got, 0, tag=9)
            assert torch.equal(got, torch.ones(5))
    assert torch.equal(t, torch.full((2,), float(N)))


# -------------------------------------------------------------- errors, names
def test_backend_name_and_group_sizes():
    assert dist.get_backend() == "ringreduce"
    assert dist.get_world_size() == N and dist.get_rank() == R
    if member("evens"):
        assert dist.get_world_size(SUB) == len(EVENS)
        assert dist.get_rank(SUB) == EVENS.index(R)


def test_unsupported_op_is_named():
    with pytest.raises(rr.RingReduceError, match="BAND"):
        dist.all_reduce(torch.ones(2, dtype=torch.int64), op=dist.ReduceOp.BAND)


def test_size_mismatch_is_a_named_error_on_every_rank():
    if N == 1:
        return
    t = torch.ones(10 + (R == N - 1))
    with pytest.raises(rr.RingReduceError, match="rank"):
        dist.all_reduce(t)
    dist.barrier()           # the group is still usable afterwards


def test_a_rank_that_skips_an_all_reduce_gets_a_named_error():
    if N == 1:
        return
    with pytest.raises(rr.RingReduceError, match="rank"):
        if R == N - 1:
            dist.broadcast(torch.ones(4), src=0)        # skipped the all_reduce
        else:
            dist.all_reduce(torch.ones(4))
    dist.barrier()


def test_wrong_output_count_is_named():
    with pytest.raises(rr.RingReduceError, match="output tensors"):
        dist.all_gather([torch.empty(2)] * (N + 1), torch.ones(2))


# ------------------------------------------------ the compression hook on gloo DDP
def test_compression_hook_when_ddp_runs_on_gloo():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=GLOO)
    state = rrt.HookState(rr.Compression.int8, process_group=GLOO, prefix="gloo.bucket")
    ddp.register_comm_hook(state, rrt.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    teacher = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    losses = []
    for step in range(20):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + R))
        loss = ((ddp(x) - x @ teacher) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert state.step == 20 and rr.compression_state().names()
    same_everywhere(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), list(range(N)))


def test_interleaving_with_gloo_never_hangs():
    # After a large receive, MPI acknowledges the sender only on our next progress; a
    # rank that then blocks in gloo (DDP-on-gloo beside ours, --compare-ddp) must have
    # sent it first, or both ranks wait forever.
    x, y = torch.zeros(2**24), torch.zeros(2**24)     # 64 MiB: segmented, rendezvous
    for _ in range(6):
        dist.all_reduce(x)
        dist.all_reduce(y, group=GLOO)
    assert not x.any() and not y.any()
