#!/usr/bin/env python3
"""Tables (markdown) and plots from a bench_cluster.sh output directory.

For each layout: the sweep table (median time, busbw, bytes sent per node per call)
and, at the largest size, each column's speed-up against the better of native's
default and its best forced algorithm. A ratio is always taken between two columns
of the same run (interleaved): ring/int8/onebit are in every forced run, so their
ratio against a forced native comes from that run; the other columns are compared
with the default native of the sweep and, for the best forced native, through the
ring measured in both runs (marked "via ring").

Example::

    python scripts/cluster/bench_report.py /tmp/rrc-bench > /tmp/rrc-bench/report.md
    python scripts/cluster/bench_report.py --targets /tmp/run1 /tmp/run2   # both runs
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def load(out: Path) -> dict:
    runs = defaultdict(dict)      # layout -> label -> run
    for f in sorted(out.glob("*.json")):
        if f.name.endswith(".links.json"):
            continue
        d = json.loads(f.read_text())
        layout = f.name.rsplit("_", 1)[0]          # e.g. 2x1_1gbit
        runs[layout][d["label"]] = d
    return runs


def rows_at(run: dict, nbytes: int) -> dict:
    return {r["column"]: r for r in run["rows"] if r["bytes"] == nbytes}


def human(b: int) -> str:
    for unit, s in (("MiB", 20), ("KiB", 10)):
        if b >= 1 << s:
            return f"{b >> s} {unit}"
    return f"{b} B"


def report(out: Path) -> str:
    lines = []
    for layout, by_label in sorted(load(out).items()):
        sweep = by_label.get("native=default")
        if sweep is None:
            continue
        lines.append(f"\n### {layout.replace('_', ' at ')} ({sweep['ranks']} ranks, "
                     f"{sweep['nodes']} nodes)\n")
        lines.append("tbf rate limit only, no added delay (no netem on this kernel). "
                     "Median of interleaved repetitions; MiB = bytes sent per node's link per "
                     "call (from the interface counters, TCP/IP headers included).\n")
        cols = list(dict.fromkeys(r["column"] for r in sweep["rows"]))
        sizes = sorted({r["bytes"] for r in sweep["rows"]})
        lines.append("| size | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for s in sizes:
            at = rows_at(sweep, s)
            cells = []
            for c in cols:
                r = at.get(c)
                if r is None:
                    cells.append("")
                    continue
                t = r["median_s"]
                tt = f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.3f} s"
                cells.append(f"{tt}, {r['busbw_gbit']:.2f} Gb/s, {r['mean_sent_mib']:.2f} MiB"
                             + ("" if r["ok"] else " **BAD**"))
            lines.append(f"| {human(s)} | " + " | ".join(cells) + " |")
        big = sizes[-1]
        at = rows_at(sweep, big)
        natives = {"default": at["mpi"]["median_s"]}
        for label, run in by_label.items():
            if label.startswith("native=forced"):
                r = rows_at(run, big).get("mpi")
                if r:
                    natives[label.split("=")[1]] = r["median_s"]
        best = min(natives, key=natives.get)
        lines.append(f"\nAt {human(big)}: native " + ", ".join(
            f"{k} {v:.3f} s" for k, v in natives.items()) + f"; better native: **{best}**.\n")
        lines.append("| column | median | vs native default (same run) | vs better native |")
        lines.append("|---|---|---|---|")
        for c in cols:
            if c == "mpi":
                continue
            t = at[c]["median_s"]
            vs_default = natives["default"] / t
            if best == "default":
                vs_best, how = vs_default, "same run"
            else:
                forced = rows_at(by_label[f"native=forced{best[6:]}"], big)
                if c in forced:
                    vs_best, how = forced["mpi"]["median_s"] / forced[c]["median_s"], "same run"
                else:   # chain through the ring, measured in both runs
                    vs_best = (forced["mpi"]["median_s"] / forced["ring"]["median_s"]) * \
                              (at["ring"]["median_s"] / t)
                    how = "via ring"
            lines.append(f"| {c} | {t:.3f} s | {vs_default:.2f}x | {vs_best:.2f}x ({how}) |")
        if sweep.get("floor"):
            lines.append("\nCompress + decompress alone (rank 0, no communication), "
                         f"{human(big)} fp32: " + "; ".join(
                             f"{k} {v['compress_s'] * 1e3:.0f} + {v['decompress_s'] * 1e3:.0f} ms "
                             f"(two-sided floor {v['floor_s'] * 1e3:.0f} ms)"
                             for k, v in sweep["floor"].items()) + ".")
    return "\n".join(lines) + "\n"


TARGETS = {  # issue 10: 64 MiB fp32 at 1 Gbit/s, vs the better of native default/best forced
    "2x1_1gbit": {"ring": 1.5, "int8": 5.0, "onebit": 12.0},
    "4x1_1gbit": {"ring": 1.5, "int8": 3.0, "onebit": 6.0},
}


def speedups(by_label: dict) -> tuple[str, dict]:
    """(better native's name, {column: speed-up vs it}) at the largest size of one run."""
    sweep = by_label["native=default"]
    big = max(r["bytes"] for r in sweep["rows"])
    at = rows_at(sweep, big)
    natives = {"default": at["mpi"]["median_s"]}
    for label, run in by_label.items():
        r = rows_at(run, big).get("mpi") if label.startswith("native=forced") else None
        if r:
            natives[label.split("=")[1]] = r["median_s"]
    best = min(natives, key=natives.get)
    out = {}
    for c, r in at.items():
        if c == "mpi":
            continue
        if best == "default":
            out[c] = natives["default"] / r["median_s"]
            continue
        forced = rows_at(by_label[f"native={best}"], big)
        out[c] = (forced["mpi"]["median_s"] / forced[c]["median_s"] if c in forced else
                  forced["mpi"]["median_s"] / forced["ring"]["median_s"]
                  * at["ring"]["median_s"] / r["median_s"])
    return best, out


def targets(dirs: list[Path]) -> str:
    """Markdown: each target's speed-up in every run (met: at least two runs meet it)."""
    runs = [load(d) for d in dirs]
    lines = ["| layout | column | target | " + " | ".join(f"run {i + 1}" for i in
                                                          range(len(dirs))) + " | met |",
             "|---|---|---|" + "---|" * len(dirs) + "---|"]
    layouts = sorted({lay for r in runs for lay in r})
    for lay in layouts:
        per_run = [speedups(r[lay]) if "native=default" in r.get(lay, {}) else None
                   for r in runs]
        cols = list(dict.fromkeys(c for pr in per_run if pr for c in pr[1]))
        for c in cols:
            want = TARGETS.get(lay, {}).get(c)
            got = [pr[1].get(c) if pr else None for pr in per_run]
            cells = [f"{g:.2f}x (vs {pr[0]})" if g else "-" for g, pr in zip(got, per_run)]
            k = sum(g is not None and g >= want for g in got) if want else 0
            # A target counts as met when at least two runs meet it.
            met = "-" if want is None else f"{'yes' if k >= 2 else 'no'} ({k} of {len(got)})"
            lines.append(f"| {lay.replace('_', ' @ ')} | {c} | "
                         f"{f'>= {want:g}x' if want else '-'} | " + " | ".join(cells)
                         + f" | {met} |")
    return "\n".join(lines) + "\n"


def plot(out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    for layout, by_label in sorted(load(out).items()):
        sweep = by_label.get("native=default")
        if sweep is None:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for c in dict.fromkeys(r["column"] for r in sweep["rows"]):
            rs = [r for r in sweep["rows"] if r["column"] == c]
            ax.plot([r["bytes"] for r in rs], [r["busbw_gbit"] for r in rs], marker="o", label=c)
        ax.axhline(sweep["rate_gbit"], color="k", ls="--", lw=1, label="link rate")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message bytes (fp32)")
        ax.set_ylabel("busbw (Gbit/s)")
        ax.set_title(f"{layout}: {sweep['ranks']} ranks / {sweep['nodes']} nodes "
                     "(tbf only, no added delay)", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"{layout}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        made.append(path)
    return made


if __name__ == "__main__":
    if sys.argv[1] == "--targets":        # bench_report.py --targets RUN1_DIR RUN2_DIR ...
        print(targets([Path(a) for a in sys.argv[2:]]))
        sys.exit(0)
    d = Path(sys.argv[1])
    text = report(d)
    (d / "report.md").write_text(text)
    print(text)
    try:
        for p in plot(d):
            print(f"plot: {p}")
    except ImportError:
        print("matplotlib not installed: no plots")
