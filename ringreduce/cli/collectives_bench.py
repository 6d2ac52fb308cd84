"""ringreduce-bench --collective allgather|reducescatter|alltoall: the other collectives vs their peers.

Same conventions as the allreduce sweep (nccl-tests style, peers interleaved
A B A B ... per repetition, median over repetitions of the slowest rank's mean
per call). The size is the bytes of the whole buffer: the allgather's result,
the reduce-scatter's input, the alltoall's send buffer (each rank gets size/n
of it). busbw = algbw * (n-1)/n, as nccl-tests reports these collectives.

Columns: "mpi" (mpi4py: Allgather, Reduce_scatter_block, Alltoall), "gloo"
(torch.distributed on gloo: all_gather_into_tensor, reduce_scatter_tensor,
all_to_all_single; skipped where this torch's gloo lacks the call), and ours:
rr.allgather / rr.reducescatter forced to "ring", "shm", "mpi" (MPI through
the engine, with its agreement round) and "auto"; rr.alltoall as "rr". Ours
are timed as a user calls them: each returns a new array (the peers write
into a buffer allocated once).

Example::

    mpirun -np 2 ringreduce-bench --collective allgather -b 4 -e 64M -f 4 -r 5
"""
from __future__ import annotations

import socket
import sys
import time

import numpy as np

__all__ = ["run", "COLLECTIVE_KINDS"]

COLLECTIVE_KINDS = ("allgather", "reducescatter", "alltoall")


def _columns(kind: str, comm, state, torch_ok, h):
    import ringreduce as rr

    _torch_view = h._torch_view
    MPI = h._mpi()
    cols = []

    def mpi_call():
        x, y = state["x"], state["y"]
        if kind == "allgather":
            comm.Allgather(x, y)
        elif kind == "reducescatter":
            comm.Reduce_scatter_block(x, y, op=MPI.SUM)
        else:
            comm.Alltoall(x, y)
    cols.append(("mpi", mpi_call, False))
    if torch_ok is not None:
        torch = torch_ok
        import torch.distributed as dist

        def gloo_call():
            tx, ty = _torch_view(torch, state["x"]), _torch_view(torch, state["y"])
            if kind == "allgather":
                dist.all_gather_into_tensor(ty, tx)
            elif kind == "reducescatter":
                dist.reduce_scatter_tensor(ty, tx)
            else:
                dist.all_to_all_single(ty, tx)
        try:
            gloo_call()               # probe: some gloo builds lack reduce_scatter
            cols.append(("gloo", gloo_call, False))
        except Exception as exc:  # noqa: BLE001  # RuntimeError or NotImplementedError from gloo
            state["skipped"] = f"gloo: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        ok = comm.allreduce(int(cols[-1][0] == "gloo"), op=MPI.MIN)
        if not ok and cols[-1][0] == "gloo":
            cols.pop()
    if kind == "alltoall":
        def rr_a2a():
            return rr.alltoall(state["x"])[0]      # our result as returned: no copy timed
        cols.append(("rr", rr_a2a, True))
        return cols
    for algo in ("ring", "shm", "mpi", "auto"):
        if kind == "allgather":
            def call(algo=algo):
                return rr.allgather(state["x"], algorithm=algo)
        else:
            def call(algo=algo):
                return rr.reducescatter(state["x"], op=rr.Sum, algorithm=algo)
        cols.append((f"rr-{algo}", call, True))
    return cols


def _reference(kind: str, n: int, rank: int, per: int, dtype, make_input):
    if kind == "allgather":
        return np.concatenate([make_input(r, per, dtype) for r in range(n)])
    if kind == "reducescatter":
        total = np.sum([make_input(r, per * n, dtype).astype(np.float64) for r in range(n)], axis=0)
        return total[rank * per:(rank + 1) * per]
    return np.concatenate([make_input(r, per * n, dtype)[rank * per:(rank + 1) * per] for r in range(n)])


def run(args, comm, sizes, h) -> int:
    """The --collective sweep (args from ringreduce-bench's parser); rank 0 prints the table.

    `h` is the ringreduce.cli.bench module (its helpers: timing, inputs, gloo set-up), passed
    in so the two modules do not import each other.
    """
    import ringreduce as rr

    _gloo_setup, _np_dtype, _time, human, make_input = (h._gloo_setup, h._np_dtype, h._time,
                                                        h.human, h.make_input)
    MPI = h._mpi()
    kind = args.collective
    n, rank = comm.Get_size(), comm.Get_rank()
    dtype = _np_dtype(args.dtype)
    state: dict = {}
    torch_ok = _gloo_setup(comm)
    rows = []
    cols = None
    for nbytes in sizes:
        per = max(1, nbytes // dtype.itemsize // n)      # elements each rank contributes / receives
        state["x"] = make_input(rank, per if kind == "allgather" else per * n, dtype)
        state["y"] = np.empty(per * n if kind != "reducescatter" else per, dtype)
        if cols is None:
            cols = _columns(kind, comm, state, torch_ok, h)
        ref = _reference(kind, n, rank, per, dtype, make_input)
        errors, once = {}, []
        for name, call, _ in cols:
            for _ in range(max(1, args.warmup)):
                call()
            state["y"].fill(0)
            got = call()                      # ours return their result, the peers fill y
            got = state["y"] if got is None else got
            err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)),
                               initial=0.0))
            errors[name] = comm.allreduce(err, op=MPI.MAX)
            once.append(_time(comm, call, 1))
        iters = int(min(args.iters, max(1, args.sample_seconds // max(float(np.median(once)), 1e-9))))
        samples: dict = {name: [] for name, _, _ in cols}
        for _ in range(args.repetitions):
            for name, call, _ in cols:          # interleaved
                samples[name].append(_time(comm, call, iters))
        real = per * n * dtype.itemsize
        native = float(np.median(samples["mpi"]))
        for name, _, ours in cols:
            t = np.asarray(samples[name])
            med = float(np.median(t))
            algbw = real / med / 1e9 if med > 0 else 0.0
            rows.append({"size": real, "collective": kind, "column": name, "time_us": med * 1e6,
                         "min_us": float(t.min()) * 1e6, "max_us": float(t.max()) * 1e6,
                         "algbw": algbw, "busbw": algbw * (n - 1) / n if n > 1 else algbw,
                         "error": errors[name], "vs_mpi": native / med if ours and med > 0 else None,
                         "vs_gloo": (float(np.median(samples["gloo"])) / med
                                     if ours and "gloo" in samples and med > 0 else None)})
    if rank == 0:
        info = rr.info()
        library = "".join(c for c in info["mpi_library"] if c.isprintable()).split(",")[0]
        print(f"# ringreduce-bench --collective {kind}  np={n}  dtype={args.dtype}  "
              f"reps={args.repetitions}  {library}  host={socket.gethostname()}  "
              f"check={'on' if info['mismatch_check'] else 'off'}  {time.strftime('%Y-%m-%d %H:%M')}")
        if state.get("skipped"):
            print(f"# skipped {state['skipped']}")
        head = (f"{'size':>10} {'column':>8} {'time(us)':>10} {'min-max(us)':>19} {'algbw':>7} "
                f"{'busbw':>7} {'error':>8} {'x mpi':>6} {'x gloo':>6}")
        print(head)
        print("-" * len(head))
        last = None
        for w in rows:
            if last is not None and w["size"] != last:
                print()
            last = w["size"]
            vm = f"{w['vs_mpi']:.2f}" if w["vs_mpi"] else "-"
            vg = f"{w['vs_gloo']:.2f}" if w["vs_gloo"] else "-"
            print(f"{human(w['size']):>10} {w['column']:>8} {w['time_us']:>10.1f} "
                  f"{w['min_us']:>9.1f}-{w['max_us']:<9.1f} {w['algbw']:>7.2f} {w['busbw']:>7.2f} "
                  f"{w['error']:>8.1e} {vm:>6} {vg:>6}")
        print("\nsize: bytes of the whole buffer (allgather result, reducescatter input, alltoall "
              "send buffer); x mpi / x gloo: peer time / our time", flush=True)
        if args.csv:
            h.write_csv(rows, args.csv)
        if args.json:
            import json
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    sys.stdout.flush()
    return 0
