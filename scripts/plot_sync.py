#!/usr/bin/env python
"""Plot and tabulate train.py --save-losses runs: loss vs steps and loss vs wire bytes.

Reads the JSON files train.py writes (each with its loss curve and the bytes
this rank sent after every step), draws the two panels side by side, and
prints a markdown table against the per-step, uncompressed run (the baseline).

    python scripts/plot_sync.py runs/*.json --out docs/img/sync_tiny_np2.png --table
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(paths):
    runs = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        d["path"] = str(p)
        runs.append(d)
    return runs


def baseline(runs):
    for d in runs:
        if d.get("sync", "step") == "step" and d.get("compression", "none") == "none":
            return d
    return None


_SYNC_ORDER = {"step": 0, "local-sgd": 1, "diloco": 2}
_COMP_ORDER = {"none": 0, "fp16": 1, "bf16": 2, "int8": 3, "int4": 4, "onebit": 5}


def order(d):
    """Table order: per-step first, then LocalSGD, then DiLoCo; by H, then compression."""
    sync = d.get("sync", "step")
    return (_SYNC_ORDER.get(sync, 9), d.get("sync_every", 0) if sync != "step" else 0,
            d.get("fragments", 1), d.get("outer_momentum", 0),
            _COMP_ORDER.get(d.get("compression", "none"), 9), d["label"])


def describe(d):
    """A short run name from the JSON's fields (older files: their label)."""
    sync = d.get("sync")
    if sync is None:
        return d["label"]
    comp = d.get("compression", "none")
    if sync == "step":
        return f"per-step sync, {comp}"
    if sync == "local-sgd":
        return f"LocalSGD H={d['sync_every']}, {comp}"
    extra = f", F={d['fragments']}" if d.get("fragments", 1) > 1 else ""
    extra += f", overlap {d['overlap_sync']}" if d.get("overlap_sync") else ""
    return (f"DiLoCo H={d['sync_every']} (outer {d.get('outer_lr', 0.7):g}/"
            f"{d.get('outer_momentum', 0.9):g}{extra}), {comp}")


def table(runs, base):
    rows = ["| run | final val loss | vs per-step | wire MiB/rank | wire vs per-step | samples/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for d in runs:
        rel = (d["final"] / base["final"] - 1) * 100 if base else float("nan")
        frac = d["wire_mib"] / base["wire_mib"] if base and base["wire_mib"] else float("nan")
        rows.append(f"| {describe(d)} | {d['final']:.4f} | {rel:+.1f} % | {d['wire_mib']:.2f} | "
                    f"1/{1 / frac:.0f} | {d.get('sps', float('nan')):.0f} |" if frac else
                    f"| {describe(d)} | {d['final']:.4f} | {rel:+.1f} % | {d['wire_mib']:.2f} | - | "
                    f"{d.get('sps', float('nan')):.0f} |")
    return "\n".join(rows)


def smooth(vals, w):
    return np.convolve(vals, np.ones(w) / w, mode="valid")


def plot(runs, out, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    lows, highs = [], []
    for d in runs:
        steps, vals = zip(*d["losses"])
        w = max(1, len(vals) // 40)   # per-step train loss is noisy: moving average
        sv = smooth(vals, w)
        lows.append(float(sv.min()))
        highs.append(float(sv[len(sv) // 8]))
        a.plot(steps[w - 1:], sv, lw=1, label=f"{describe(d)} ({d['final']:.3f})")
        _, wbytes = zip(*d["wire"])
        mib = np.asarray(wbytes, dtype=float)[w - 1:] / 2**20
        keep = mib > 0
        b.plot(mib[keep], sv[keep], lw=1)
    if lows:   # the curves differ in the tail: show it rather than the first steps' drop
        a.set_ylim(min(lows) - 0.05, max(highs) + 0.05)
    a.set_xlabel("step")
    a.set_ylabel("train loss (rank 0, moving average)")
    a.legend(fontsize=7, title="run (final val loss)", title_fontsize=7)
    b.set_xscale("log")
    b.set_xlabel("MiB sent per rank so far (log)")
    b.set_ylabel("train loss (rank 0, moving average)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot written to {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", help="PNG to write")
    p.add_argument("--only", nargs="*", default=None,
                   help="plot only these runs (JSON file names without .json)")
    p.add_argument("--title", default="train.py, tiny preset")
    p.add_argument("--table", action="store_true", help="print a markdown table")
    args = p.parse_args()
    runs = sorted(load(args.files), key=order)
    base = baseline(runs)
    if args.table:
        print(table(runs, base))
    if args.out:
        shown = runs if not args.only else [d for d in runs if Path(d["path"]).stem in args.only]
        plot(shown, args.out, args.title)


if __name__ == "__main__":
    main()
