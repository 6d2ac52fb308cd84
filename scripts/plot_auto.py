#!/usr/bin/env python
"""Plots of Compression.auto from scripts/train.py --save-losses files (docs/compression.md).

    python scripts/plot_auto.py OUTDIR/*_auto*.losses.json OUTDIR/*_int8*.losses.json \
        --loss docs/img/auto_loss.png --choices docs/img/auto_choices.png

--loss: training loss over steps (moving average) of every file, plus torch DDP's from
the first file that has it (train.py --compare-ddp). --choices: auto's format per bucket
over its calls (one call per bucket per step), from the first file that ran auto.
scripts/cluster/train_cluster.sh writes such files next to its logs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ORDER = ["none", "bf16", "fp16", "int8", "int4", "onebit"]


def smooth(pairs, w):
    steps, vals = zip(*pairs)
    w = max(1, min(w, len(vals)))
    return steps[w - 1:], np.convolve(vals, np.ones(w) / w, mode="valid")


def plot_loss(runs, path, window):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ddp = next((d for d in runs if d.get("ddp_losses")), None)
    if ddp is not None:
        s, v = smooth(ddp["ddp_losses"], window)
        ax.plot(s, v, lw=1.2, color="k", label=f"torch DDP (final val {ddp['ddp_final']:.3f})")
    for d in runs:
        s, v = smooth(d["losses"], window)
        ax.plot(s, v, lw=1.2, label=f"{d['compression']} (final val {d['final']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss, rank 0 ({window}-step mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def plot_choices(run, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    names = sorted(run["auto"])
    used = set()
    for i, name in enumerate(names):
        t = run["auto"][name]
        xs, ys = [], []
        for h in t["history"]:
            xs.append(h["call"])
            ys.append(ORDER.index(h["format"]))
            used.add(h["format"])
        xs.append(t["calls"])
        ys.append(ys[-1] if ys else 0)
        label = name.split(".")[2] if name.startswith("grad.bucket.") else name
        ax.step(xs, np.array(ys) + 0.06 * (i - (len(names) - 1) / 2), where="post", lw=1.5,
                label=f"bucket {label} ({t['format']} at the end)")
    ax.set_yticks(range(len(ORDER)), ORDER)
    ax.set_xlabel("call (one per bucket per step)")
    ax.set_ylabel("format")
    ax.set_title(f"Compression.auto's choice per bucket ({run['compression']}, "
                 f"{run['ranks']} ranks)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="--save-losses JSON files")
    p.add_argument("--loss", metavar="PNG", help="loss curves")
    p.add_argument("--choices", metavar="PNG", help="auto's format per bucket over calls")
    p.add_argument("--window", type=int, default=10, help="moving-average steps")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    runs = [json.loads(Path(f).read_text()) for f in args.files]
    if args.loss:
        plot_loss(runs, args.loss, args.window)
    if args.choices:
        auto = next((d for d in runs if d.get("auto")), None)
        if auto is None:
            raise SystemExit("no file has auto's choices (train.py --compression auto "
                             "--save-losses)")
        plot_choices(auto, args.choices)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
