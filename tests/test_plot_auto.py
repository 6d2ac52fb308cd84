"""scripts/plot_auto.py draws both plots from train.py --save-losses files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]


def test_plot_auto(tmp_path):
    losses = [[s, 3.0 - 0.01 * s] for s in range(1, 31)]
    auto = {"grad.bucket.0.float32.ab": {"calls": 30, "format": "int8", "history": [
        {"call": 3, "format": "fp16", "why": "trial"},
        {"call": 6, "format": "int8", "why": "fastest within quality"}]}}
    a, b = tmp_path / "auto.json", tmp_path / "int8.json"
    a.write_text(json.dumps({"compression": "auto", "final": 2.7, "losses": losses, "ranks": 2,
                             "ddp_losses": losses, "ddp_final": 2.7, "auto": auto}))
    b.write_text(json.dumps({"compression": "int8", "final": 2.7, "losses": losses, "ranks": 2}))
    out = subprocess.run([sys.executable, str(ROOT / "scripts/plot_auto.py"), str(a), str(b),
                          "--loss", str(tmp_path / "l.png"), "--choices", str(tmp_path / "c.png")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "l.png").stat().st_size > 1000
    assert (tmp_path / "c.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/plot_auto.py"), str(b),
                          "--choices", str(tmp_path / "x.png")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "auto's choices" in bad.stderr


def test_train_saves_ddp_losses_and_auto_choices(tmp_path):
    # scripts/train.py --compare-ddp --save-losses: DDP's losses and auto's choices per
    # tensor go into the file that plot_auto.py reads (train_cluster.sh writes such files).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mpi_util import run_mpi

    out_json = tmp_path / "auto.losses.json"
    code, out = run_mpi(2, [sys.executable, str(ROOT / "scripts" / "train.py"), "--steps", "5",
                            "--batch-size", "4", "--eval-batches", "2", "--data-bytes", "400000",
                            "--no-progress", "--compression", "auto", "--compare-ddp",
                            "--save-losses", str(out_json)], timeout=240)
    assert code == 0, out[-10000:]
    d = json.loads(out_json.read_text())
    assert len(d["losses"]) == 5 and len(d["ddp_losses"]) == 5 and d["ddp_final"] > 0
    assert d["auto"] and all(t["calls"] == 5 and t["history"] for t in d["auto"].values())
    png = tmp_path / "c.png"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/plot_auto.py"), str(out_json),
                           "--loss", str(tmp_path / "l.png"), "--choices", str(png)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert png.stat().st_size > 1000
