"""tools/bench_checkpoint.py end to end at a tiny size: two ranks save (sync, then async:
the later saves reuse the cached plan), save again while training, write the disk
baseline and load back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_checkpoint_tiny(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(REPO / "tools/bench_checkpoint.py"), "--sizes", "0.002"]
    cmd += ["--layouts", "dp", "--dir", str(tmp_path / "bench"), "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (row,) = json.loads(out.read_text())
    assert row["layout"] == "dp" and 0 < row["checkpoint_gb"] < 0.05
    for key in ("sync_s", "async_blocked_s", "plan_s", "stage_s", "write_s", "disk_s", "load_s"):
        assert row[key] > 0, key
    assert row["async_blocked_s"] < row["sync_s"]
    assert len(row["peak_rss_gb"]) == 2 and min(row["peak_rss_gb"]) > 0
    # an async save while training goes on: steps taken, the memory it took measured
    assert row["overlap_steps"] >= 1 and len(row["overlap_mem_rise_gb"]) == 2
    assert "DP=2" in proc.stdout and "% of sync" in proc.stdout
