"""ringreduce-bench: allreduce size sweep with peers measured side by side (nccl-tests style).

Run it under mpirun; every rank runs the same sweep and rank 0 prints the table.
For each message size, each repetition times every column once, in turn
(A B A B ...), so machine noise hits all columns alike; the table shows the
median over repetitions, algbw = bytes / time, busbw = algbw * 2(n-1)/n, the
largest error against a numpy reference, and each of our columns' speed
relative to native MPI_Allreduce (native time / our time, above 1 = faster).

Columns: "mpi" (MPI_Allreduce through mpi4py), "ps" (naive parameter server:
gather to rank 0, reduce, broadcast), "gloo" (torch.distributed all_reduce,
when torch is installed), our "ring", "tree", "shm", "auto", and each
compression given with -c (auto algorithm, error feedback as configured).

Example::

    mpirun -np 2 ringreduce-bench -b 4 -e 64M -f 4 -r 5 --csv out.csv --plot out.png
    mpirun -np 2 ringreduce-bench --tune           # fit the cost model, write the tuning file
    ringreduce-bench --kernels                     # the compression kernels' own benchmark
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import numpy as np

from ..policy import cost, tuning
from ..policy import plan as select
from ..policy.fit import TUNE_ALGORITHMS, fit, measure_gamma, measured_best

COLUMNS = ("mpi", "ps", "gloo", "ring", "tree", "shm", "auto")
PEERS = ("mpi", "ps", "gloo")
OPS = ("sum", "avg", "min", "max")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64")


def parse_size(text: str) -> int:
    """'4' -> 4, '64K' -> 65536, '16M', '1G' (binary units, as nccl-tests)."""
    t = text.strip().upper().rstrip("B")
    mult = 1
    if t and t[-1] in "KMG":
        mult = 1 << (10 * ("KMG".index(t[-1]) + 1))
        t = t[:-1]
    value = float(t) * mult
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must be >= 0: {text}")
    return int(value)


def sizes_between(begin: int, end: int, factor: float) -> list[int]:
    if factor <= 1:
        raise SystemExit("-f must be > 1")
    out, s = [], max(begin, 1)
    while s <= end:
        out.append(int(s))
        s = s * factor
    return out


def human(nbytes: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return str(nbytes)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_input(rank: int, count: int, dtype) -> np.ndarray:
    """Rank `rank`'s input (regenerable anywhere, so every rank can build the reference)."""
    rng = np.random.default_rng(1234 + rank)
    if dtype.kind in "iu":
        return rng.integers(-100, 100, count).astype(dtype)
    return rng.standard_normal(count, dtype=np.float32).astype(dtype)


def reference(op: str, n: int, count: int, dtype) -> np.ndarray:
    """The exact answer (float64 for floats) for all ranks' inputs."""
    wide = dtype if dtype.kind in "iu" else np.float64
    acc = make_input(0, count, dtype).astype(wide)
    for r in range(1, n):
        x = make_input(r, count, dtype).astype(wide)
        if op in ("sum", "avg"):
            acc += x
        elif op == "min":
            np.minimum(acc, x, out=acc)
        else:
            np.maximum(acc, x, out=acc)
    if op == "avg":
        acc /= n
    return acc


def max_error(result: np.ndarray, ref: np.ndarray) -> float:
    """Largest |result - ref| relative to the reference's largest magnitude (0 = exact)."""
    if result.size == 0:
        return 0.0
    diff = np.abs(result.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(diff)) / scale


class Column:
    """One measured peer or algorithm: `call()` reduces self.x into self.y."""

    def __init__(self, name: str, call, ours: bool, compression=None):
        self.name = name
        self.call = call
        self.ours = ours
        self.compression = compression


def _gloo_setup(comm):
    """torch.distributed with gloo, rendezvous on a free port chosen by rank 0 (None if no torch)."""
    try:
        import torch
        import torch.distributed as dist
    except Exception:
        torch = None
    ok = comm.allreduce(int(torch is not None), op=_mpi().MIN)
    if not ok:
        return None
    if not dist.is_initialized():
        from ..torch.gloo import init_gloo
        init_gloo(comm)
    return torch


def _one_node(comm) -> bool:
    sub = comm.Split_type(_mpi().COMM_TYPE_SHARED)
    same = sub.Get_size() == comm.Get_size()
    sub.Free()
    return same


def _mpi():
    from ..core.mpi import MPI
    return MPI


def _torch_view(torch, a: np.ndarray):
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def build_columns(names, comps, comm, state, routed_mpi: bool = False) -> list[Column]:
    """The columns to time, each closing over state['x'] / state['y'] (set per size).

    routed_mpi: the "mpi" column is ``rr.allreduce(algorithm="mpi")`` (what auto runs when
    it picks native MPI: the check's handshake and our call around MPI's) instead of
    MPI_Allreduce alone, so that --tune prices every candidate as auto will run it."""
    import ringreduce as rr
    MPI = _mpi()
    n = comm.Get_size()
    op = state["op"]
    rr_op = {"sum": rr.Sum, "avg": rr.Average, "min": rr.Min, "max": rr.Max}[op]
    mpi_op = {"sum": MPI.SUM, "avg": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op]
    ufunc = {"sum": np.add, "avg": np.add, "min": np.minimum, "max": np.maximum}[op]
    half = state["dtype"].itemsize == 2 and state["dtype"].kind in "fV"
    cols = []
    for name in names:
        if name == "mpi" and not routed_mpi:
            if half:
                continue          # MPI has no half-type reduction

            def call():
                x, y = state["x"], state["y"]
                comm.Allreduce(x, y, op=mpi_op)
                if op == "avg":
                    np.divide(y, y.dtype.type(n), out=y)
            cols.append(Column("mpi", call, False))
        elif name == "ps":
            def call():
                x, y = state["x"], state["y"]
                raw = x.view(np.uint8)
                if comm.Get_rank() == 0:
                    gathered = state["ps_buf"][:n * raw.size]
                    comm.Gather([raw, MPI.BYTE], [gathered, MPI.BYTE], root=0)
                    rows = gathered.reshape(n, raw.size)
                    y[...] = rows[0].view(y.dtype)
                    for i in range(1, n):
                        ufunc(y, rows[i].view(y.dtype), out=y)
                    if op == "avg":
                        np.divide(y, y.dtype.type(n), out=y)
                else:
                    comm.Gather([raw, MPI.BYTE], None, root=0)
                comm.Bcast([y.view(np.uint8), MPI.BYTE], root=0)
            cols.append(Column("ps", call, False))
        elif name == "gloo":
            torch = _gloo_setup(comm)
            if torch is None:
                continue
            import torch.distributed as dist
            top = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                   "max": dist.ReduceOp.MAX}[op]

            def call():
                x, y = state["x"], state["y"]
                ty = _torch_view(torch, y)
                ty.copy_(_torch_view(torch, x))      # gloo has no out-of-place all_reduce
                dist.all_reduce(ty, op=top)
                if op == "avg":
                    ty.div_(n)
            cols.append(Column("gloo", call, False))
        else:
            if name == "mpi" and half:
                continue

            def call(algo=name):
                rr.allreduce(state["x"], op=rr_op, algorithm=algo, out=state["y"])
            cols.append(Column(name, call, True))
    for cname in comps:
        comp = rr.Compression.by_name(cname)

        def call(comp=comp, cname=cname):
            rr.allreduce(state["x"], op=rr_op, compression=comp, name=f"bench-{cname}-{state['x'].size}",
                         out=state["y"])
        cols.append(Column(cname, call, True, compression=comp))
    return cols


def _time(comm, fn, iters: int) -> float:
    """Seconds per call, the slowest rank's (every rank returns the same value)."""
    fn()                   # untimed: absorbs the switch from the previous column
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t0) / iters
    return comm.allreduce(dt, op=_mpi().MAX)


def _settle_auto(call, x, op: str, limit: int = 400) -> int:
    """Call auto until it has learned this size, as a job's first calls would (no tuning file);
    returns how many calls that took (0: nothing to learn, e.g. a tuning file or the tiny path)."""
    from ..core.ops import ReduceOp
    from ..policy import learn
    from ..runtime.context import context
    learner = context().main.learner
    rop = {"sum": ReduceOp.SUM, "avg": ReduceOp.AVERAGE, "min": ReduceOp.MIN, "max": ReduceOp.MAX}[op]
    if learner is None or x.nbytes <= learn.MIN_BYTES:
        return 0
    half = select.without_native(x.dtype, rop)
    calls = 0
    while not learner.settled(x.nbytes, half) and calls < limit:   # same count on every rank
        call()
        calls += 1
    return calls


def run_sweep(args, comm, sizes, names, comps, progress=True, routed_mpi=False) -> list[dict]:
    """Time every column at every size; returns one row dict per (size, column)
    (routed_mpi: see build_columns)."""
    n, rank = comm.Get_size(), comm.Get_rank()
    dtype = _np_dtype(args.dtype)
    maxcount = max(1, max(sizes) // dtype.itemsize)
    state = {"op": args.op, "dtype": dtype}
    full_x = make_input(rank, maxcount, dtype)
    full_ref = reference(args.op, n, maxcount, dtype)
    full_y = np.empty_like(full_x)
    state["ps_buf"] = np.empty(n * full_x.nbytes if rank == 0 else 0, np.uint8)
    cols = build_columns(names, comps, comm, state, routed_mpi)
    bar = None
    if progress and rank == 0 and not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(sizes) * args.repetitions * len(cols), unit="sample",
                       file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    rows = []
    for nbytes in sizes:
        count = max(1, nbytes // dtype.itemsize)
        state["x"], state["y"] = full_x[:count], full_y[:count]
        ref = full_ref[:count]
        real = count * dtype.itemsize
        # Warm-up, correctness and a first timing decide the iteration count (same on every rank).
        errors, ratios, iters = {}, {}, {}
        learned = 0
        for col in cols:
            for _ in range(max(1, args.warmup)):
                col.call()
            if col.name == "auto":
                learned = _settle_auto(col.call, state["x"], args.op)
            state["y"].fill(0)
            col.call()
            errors[col.name] = comm.allreduce(max_error(state["y"], ref), op=_mpi().MAX)
            if col.compression is not None:
                import ringreduce as rr
                stats = rr.last_stats()
                ratios[col.name] = getattr(stats, "ratio", float("nan"))
            iters[col.name] = _time(comm, col.call, 1)
        # One iteration count for every column of a size (as nccl-tests), from the median
        # column, so fixed per-sample costs weigh the same everywhere.
        once = float(np.median(list(iters.values())))
        count_iters = int(min(args.iters, max(1, args.sample_seconds // max(once, 1e-9))))
        iters = {name: count_iters for name in iters}
        samples = {col.name: [] for col in cols}
        for _ in range(args.repetitions):
            for col in cols:            # interleaved: A B C A B C ...
                samples[col.name].append(_time(comm, col.call, iters[col.name]))
                if bar is not None:
                    bar.update(1)
        native = float(np.median(samples["mpi"])) if "mpi" in samples else None
        for col in cols:
            t = np.asarray(samples[col.name])
            med = float(np.median(t))
            algbw = real / med / 1e9 if med > 0 else 0.0
            rows.append({
                "size": real, "count": count, "dtype": args.dtype, "op": args.op,
                "algorithm": col.name, "ours": col.ours, "ranks": n,
                "time_us": med * 1e6, "min_us": float(t.min()) * 1e6, "max_us": float(t.max()) * 1e6,
                "algbw": algbw, "busbw": algbw * (2 * (n - 1) / n if n > 1 else 1.0),
                "error": errors[col.name], "iters": iters[col.name],
                "vs_mpi": (native / med) if (native and col.ours and med > 0) else None,
                "compression_ratio": ratios.get(col.name),
                "learn_calls": learned if col.name == "auto" else None,
            })
    if bar is not None:
        bar.close()
    return rows


def format_table(rows: list[dict], n: int, header: str = "") -> str:
    """nccl-tests-like text table: one block per size, one line per column."""
    head = (f"{'size':>10} {'count':>10} {'type':>8} {'algorithm':>9} {'time(us)':>10} "
            f"{'min-max(us)':>19} {'algbw':>7} {'busbw':>7} {'error':>9} {'x mpi':>6} {'cratio':>6}")
    lines = [header, head, "-" * len(head)] if header else [head, "-" * len(head)]
    last = None
    for w in rows:
        if last is not None and w["size"] != last:
            lines.append("")
        last = w["size"]
        vs = f"{w['vs_mpi']:.2f}" if w["vs_mpi"] else "-"
        cr = f"{w['compression_ratio']:.2f}" if w.get("compression_ratio") else "-"
        lines.append(f"{w['size']:>10} {w['count']:>10} {w['dtype']:>8} {w['algorithm']:>9} "
                     f"{w['time_us']:>10.1f} {w['min_us']:>9.1f}-{w['max_us']:<9.1f} "
                     f"{w['algbw']:>7.2f} {w['busbw']:>7.2f} {w['error']:>9.2e} {vs:>6} {cr:>6}")
    lines.append("")
    lines.append("time: median over repetitions of the slowest rank's mean per call; "
                 "algbw/busbw in GB/s; error: max |result - exact| / max |exact|; "
                 "x mpi: native time / our time")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    import csv
    keys = list(rows[0].keys()) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: str, title: str) -> None:
    """busbw and latency vs size, one line per column (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(w["algorithm"] for w in rows))
    for name in names:
        pts = [w for w in rows if w["algorithm"] == name]
        xs = [w["size"] for w in pts]
        style = "-o" if pts[0]["ours"] else "--s"
        ax1.plot(xs, [w["busbw"] for w in pts], style, label=name, markersize=3)
        ax2.plot(xs, [w["time_us"] for w in pts], style, label=name, markersize=3)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("busbw (GB/s)")
    ax2.set_yscale("log")
    ax2.set_ylabel("time per allreduce (us)")
    ax1.legend(fontsize=8)
    fig.suptitle("".join(c for c in title if c.isprintable()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- tuning

def plot_model(rows: list[dict], params: dict, n: int, path: str) -> None:
    """Measured time vs the fitted model's prediction, per algorithm (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, algo in enumerate(TUNE_ALGORITHMS):
        pts = [w for w in rows if w["algorithm"] == algo]
        if not pts or algo not in params["algorithms"]:
            continue
        xs = np.array([w["size"] for w in pts])
        color = f"C{i}"
        ax.plot(xs, [w["time_us"] for w in pts], "o", color=color, markersize=4, label=f"{algo} measured")
        grid = np.geomspace(max(1, xs.min()), xs.max(), 60)
        ax.plot(grid, [cost.predict(params, algo, m, n) * 1e6 for m in grid], "-", color=color,
                alpha=0.7, label=f"{algo} model")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("time per allreduce (us)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"cost model vs measurement, np={n}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune(args, comm) -> int:
    """Measure each algorithm as auto runs it, fit the model, write the tuning file on rank 0.

    Every candidate is timed through rr.allreduce with the mismatch check as this job
    has it (on unless RINGREDUCE_CHECK=0), native MPI included: the check does not cost
    every candidate alike (staged shm uses its handshake as the data barrier, a native
    call pays it before MPI starts). Pricing bare MPI_Allreduce against our check-free
    calls put 16-64 KiB on native MPI, which then took native + 13-21 us per call with the
    check (2-core VM, np=2, 2026-12-07) where shm took native + 0-4 us.
    """
    n, rank = comm.Get_size(), comm.Get_rank()
    sizes = sizes_between(args.begin, args.end, args.factor)
    ag_sizes = [s for s in sizes if n * s <= select.ALLGATHER_MAX_TOTAL_BYTES]
    rows = run_sweep(args, comm, sizes, ["mpi", "tree", "ring", "shm"], [], routed_mpi=True)
    if ag_sizes:
        rows += run_sweep(args, comm, ag_sizes, ["allgather"], [], progress=False)
    gamma = comm.bcast(measure_gamma() if rank == 0 else None, root=0)
    fitted = fit(rows, gamma, n)
    one_node = _one_node(comm)
    if rank == 0:
        params = tuning.load()
        params.update({k: v for k, v in fitted.items() if k != "algorithms"})
        for algo, p in fitted["algorithms"].items():
            params["algorithms"][algo] = p
        params.update(source="ringreduce-bench --tune", ranks=n, host=socket.gethostname(),
                      date=time.strftime("%Y-%m-%d %H:%M:%S"))
        params["measured"] = {"ranks": n, "node_local": one_node, "points": measured_best(rows)}
        path = tuning.save(params, args.tuning_file)
        plan = select.make_plan(params, n, node_local=one_node)
        print(f"wrote {path}")
        print(f"gamma = {gamma:.3e} s/byte")
        for algo, p in params["algorithms"].items():
            print(f"{algo:>10}: alpha = {p['alpha'] * 1e6:8.2f} us   beta = {p['beta']:.3e} s/byte")
        print("auto, full types:", plan.describe()["full"])
        print("auto, half types:", plan.describe()["half"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"params": params, "rows": rows}, f, indent=1)
        if args.plot:
            plot_model(rows, params, n, args.plot)
            print(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringreduce-bench", description=__doc__.splitlines()[0])
    p.add_argument("-b", "--begin", type=parse_size, default=parse_size("4"), help="smallest size (4, 1K, 1M)")
    p.add_argument("-e", "--end", type=parse_size, default=parse_size("64M"), help="largest size")
    p.add_argument("-f", "--factor", type=float, default=4, help="size multiplier between rows")
    p.add_argument("-d", "--dtype", default="float32", choices=DTYPES)
    p.add_argument("-o", "--op", default="sum", choices=OPS)
    p.add_argument("-w", "--warmup", type=int, default=3, help="warm-up calls per size and column")
    p.add_argument("-n", "--iters", type=int, default=50, help="most calls per sample")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="interleaved samples per column")
    p.add_argument("--sample-seconds", type=float, default=0.05,
                   help="aim for samples of about this long (fewer iterations for large sizes)")
    p.add_argument("-a", "--algorithms", default=",".join(COLUMNS),
                   help=f"comma list of columns (default {','.join(COLUMNS)})")
    p.add_argument("-c", "--compression", default="",
                   help="comma list of compressions to add as columns (fp16,bf16,int8,int4,onebit)")
    p.add_argument("--csv", help="write the rows as CSV")
    p.add_argument("--json", help="write the rows as JSON")
    p.add_argument("--plot", help="write busbw/latency plots (PNG); with --tune, model vs measured")
    p.add_argument("--tune", action="store_true", help="fit the cost model and write the tuning file")
    p.add_argument("--tuning-file", help="where --tune writes (default: RINGREDUCE_TUNING or the cache dir)")
    p.add_argument("--forget", action="store_true",
                   help="delete auto's learned cache first (out-of-the-box figures: auto learns afresh)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--collective", default="allreduce",
                   choices=("allreduce", "allgather", "reducescatter", "alltoall"),
                   help="the collective to sweep (default allreduce; the others: cli/collectives_bench.py)")
    p.add_argument("--kernels", action="store_true",
                   help="run the compression-kernel benchmark instead (remaining arguments go to it)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--kernels" in argv:
        from . import kernel_bench as bench_kernels
        rest = [a for a in argv if a != "--kernels"]
        return bench_kernels.main(rest) or 0
    args = parser().parse_args(argv)
    if args.forget:
        from ..policy import learn
        learn.forget()        # before init: rank 0 reads the cache there
    import ringreduce as rr
    rr.init()
    from ..runtime.context import context
    comm = context().user_comm.Dup()     # peers get their own communicator
    try:
        if args.tune:
            return tune(args, comm)
        names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        comps = [c.strip() for c in args.compression.split(",") if c.strip()]
        bad = [a for a in names if a not in COLUMNS]
        if bad:
            raise SystemExit(f"unknown column(s) {bad}; choose from {','.join(COLUMNS)}")
        sizes = sizes_between(args.begin, args.end, args.factor)
        if args.collective != "allreduce":
            from .collectives_bench import run as run_collective
            return run_collective(args, comm, sizes, sys.modules[__name__])
        rows = run_sweep(args, comm, sizes, names, comps)
        if comm.Get_rank() == 0:
            n = comm.Get_size()
            info = rr.info()
            library = "".join(c for c in info["mpi_library"] if c.isprintable()).split(",")[0]
            header = (f"# ringreduce-bench  np={n}  dtype={args.dtype}  op={args.op}  "
                      f"reps={args.repetitions}  {library}  host={socket.gethostname()}  "
                      f"check={'on' if info['mismatch_check'] else 'off'}  "
                      f"learning={info['learning'].split(' ')[0]}  "
                      f"{time.strftime('%Y-%m-%d %H:%M')}")
            print(format_table(rows, n, header), flush=True)
            taught = [(w["size"], w["learn_calls"]) for w in rows if w.get("learn_calls")]
            if taught:
                print("auto learned each size in (calls, before timing): "
                      + ", ".join(f"{sz} B: {c}" for sz, c in taught), flush=True)
            if args.csv:
                write_csv(rows, args.csv)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"header": header, "rows": rows}, f, indent=1)
            if args.plot:
                plot(rows, args.plot, header.lstrip("# "))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
