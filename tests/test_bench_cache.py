"""Smoke test of bench/cache.py: the quick run completes, writes every JSON field, PNG round trips exactly,
and leaves no temporary cache behind. Timings are never asserted: they depend on the machine and its load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "cache.py"


def test_quick_cache_benchmark_reports_every_rate(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["config"]["resolutions"] == [32] and res["meta"]["quick"] is True
    (row,) = res["resolutions"]
    assert row["resolution"] == 32 and row["pairs"] >= res["config"]["take_batch"]
    assert row["trainer"]["img_s"] > 0
    assert row["raw"]["write_pairs_s"] > 0 and row["webdataset_png"]["write_pairs_s"] > 0
    assert set(row["raw"]["read_pairs_s"]) == {"cold_verify", "warm_verify", "cold_noverify", "warm_noverify"}
    assert set(row["webdataset_png"]["read_pairs_s"]) == {"cold", "warm"}
    assert all(v > 0 for v in [*row["raw"]["read_pairs_s"].values(), *row["webdataset_png"]["read_pairs_s"].values()])
    assert set(row["read_over_trainer"]) == {f"raw_{k}" for k in row["raw"]["read_pairs_s"]} | {
        f"png_{k}" for k in row["webdataset_png"]["read_pairs_s"]}
    assert row["read_over_trainer"]["raw_warm_verify"] == row["raw"]["read_pairs_s"]["warm_verify"] / row["trainer"]["img_s"]
    assert set(row["raw_over_png"]) == {"write", "read_warm", "read_cold"}
    # The raw shard holds exactly the pixels (plus .npy headers and records); PNG came back bit for bit.
    assert row["raw"]["bytes_per_pair"] >= row["pair_bytes"]
    assert row["webdataset_png"]["lossless"] is True and res["summary"]["png_lossless"] is True
    assert res["meta"]["filesystem"] and res["meta"]["cpu_count"] >= 1 and res["meta"]["date"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert not list(tmp_path.glob(".cache-bench-*"))  # the temporary cache and tars are removed
    assert "R = 32" in proc.stdout and "raw .npy, CRC verify" in proc.stdout and "webdataset PNG tar" in proc.stdout
