"""Smoke test of bench/ring.py: the quick run completes, every pair arrives intact, and the segments are gone.

Timings are never asserted: they depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from onlinemix.exchange.ring import NAME_PREFIX, SHM_DIR

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "ring.py"


def test_quick_ring_benchmark_moves_every_pair_intact(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=SCRIPT.parent.parent)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    # The benchmark's rings are named after it (onlinemix-<pid>-...): none may be left behind. (Not a global
    # before/after diff of /dev/shm, which other processes' rings could disturb.)
    assert not list(SHM_DIR.glob(f"{NAME_PREFIX}{proc.pid}-*"))
    res = json.loads(out.read_text())

    assert res["config"]["resolutions"] == [64] and res["config"]["consumers"] == [1]
    assert res["config"]["producers"] == [1, 2] and res["config"]["verify"] == [True, False]
    (block,) = res["resolutions"]
    assert block["memcpy"]["gb_s"] > 0 and block["memcpy"]["pairs_s"] > 0
    rows = block["ring"]
    assert {(r["producers"], r["consumers"], r["checksums"]) for r in rows} == {
        (p, 1, v) for p in (1, 2) for v in (True, False)}
    for row in rows:
        assert row["pairs_s"] > 0 and row["gb_s"] > 0
        assert row["queue_pairs_s"] is not None and row["queue_pairs_s"] > 0
        assert row["x_memcpy"] > 0 and row["x_queue"] > 0
        assert row["memcpy_target"] in ("PASS", "MISS") and row["queue_target"] in ("PASS", "MISS")
        # Every pair was received exactly once, by the consumer that asked for it, with the right contents.
        assert row["all_pairs_intact"] is True
        assert row["received"] == row["pairs"] and row["missing"] == row["duplicates"] == row["bad_checksums"] == 0
        assert row["ring_checksum_errors"] == 0 and row["ring_generated"] == row["pairs"]
    for q in block["queue"]:
        assert q["pairs_s"] > 0 and q["all_pairs_intact"] is True

    assert res["summary"]["all_pairs_intact"] is True
    # P = 1, C = 1 has a core per process on any machine: both targets are judged, on its rows' worst ratio
    own_core = [row for row in rows if row["producers"] + row["consumers"] <= res["meta"]["cpu_count"]]
    assert [t["status"] in ("PASS", "MISS") for t in res["targets"]] == [True, True]
    assert res["targets"][0]["value"] == min(row["x_memcpy"] for row in own_core)
    assert res["meta"]["segments_left"] == []
    assert res["meta"]["cpu_count"] >= 1 and res["meta"]["date"]
    png = out.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 0
    assert "R = 64" in stdout and ("PASS" in stdout or "MISS" in stdout)
    assert "contention" in stdout


def test_help_explains_every_flag() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for flag in ("--resolutions", "--producers", "--consumers", "--write-batch", "--take-batch", "--checksums",
                 "--sharing-strategy", "--out", "--quick"):
        assert flag in proc.stdout
