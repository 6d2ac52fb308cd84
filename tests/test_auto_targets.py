"""scripts/auto_targets.py: the out-of-the-box table and the per-launch verdicts from bench JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "auto_targets.py"


def _launch(path: Path, times: dict[int, dict[str, float]]) -> Path:
    rows = [{"size": size, "algorithm": a, "time_us": t} for size, cols in times.items() for a, t in cols.items()]
    path.write_text(json.dumps({"header": "# test", "rows": rows}))
    return path


def test_table_and_verdicts(tmp_path):
    good = {256: {"mpi": 2.0, "ring": 50.0, "tree": 20.0, "shm": 5.0, "auto": 5.9},          # 2.95x
            4096: {"mpi": 5.0, "ring": 50.0, "tree": 20.0, "shm": 6.0, "auto": 7.9},          # + 2.9 us
            1 << 20: {"mpi": 200.0, "ring": 400.0, "tree": 400.0, "shm": 180.0, "auto": 206.0}}   # 1.14x shm
    bad = {256: {"mpi": 2.0, "ring": 50.0, "tree": 20.0, "shm": 5.0, "auto": 6.2},           # 3.1x
           4096: {"mpi": 5.0, "ring": 50.0, "tree": 20.0, "shm": 6.0, "auto": 8.5},           # + 3.5 us
           1 << 20: {"mpi": 200.0, "ring": 400.0, "tree": 400.0, "shm": 180.0, "auto": 216.0}}  # 1.20x
    out = subprocess.run([sys.executable, str(SCRIPT), str(_launch(tmp_path / "a.json", good)),
                          str(_launch(tmp_path / "b.json", bad))],
                         capture_output=True, text=True, check=True).stdout
    assert "| 1 MiB | 200 | 400 | 400 | 180 | 206-216 | 1.14, 1.20 (shm) |  |" in out
    assert "| 4 KiB | 5.0 | 50.0 | 20.0 | 6.0 | 7.9-8.5 | 1.58, 1.70 (mpi) | +2.9, +3.5 |" in out
    assert "launch 1: every target met" in out
    assert "launch 2: missed at 256 B: 3.10x native; 4 KiB: native + 3.5 us; 1 MiB: 1.20x best" in out
