"""Smoke test of bench/cache.py: the quick run completes, writes every JSON field for both cache formats, raw
and PNG round trip exactly, and it leaves no temporary cache behind. Timings are never asserted: they depend
on the machine and its load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "cache.py"


def test_quick_cache_benchmark_reports_every_rate(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["config"]["resolutions"] == [32] and res["meta"]["quick"] is True
    (row,) = res["resolutions"]
    assert row["resolution"] == 32 and row["images"] >= res["config"]["take_batch"]
    assert row["trainer"]["img_s"] > 0 and res["config"]["jpeg_quality"] == 95
    reads = {"cold_verify", "warm_verify", "cold_noverify", "warm_noverify"}
    assert set(row["formats"]) == {"raw", "jpeg"}
    for f in row["formats"].values():
        assert f["write_s"] > 0 and set(f["read_s"]) == reads and all(v > 0 for v in f["read_s"].values())
    assert row["webdataset_png"]["write_s"] > 0 and set(row["webdataset_png"]["read_s"]) == {"cold", "warm"}
    assert set(row["read_over_trainer"]) == {f"{fmt}_{k}" for fmt in ("raw", "jpeg") for k in reads} | {
        "png_cold", "png_warm"}
    assert row["read_over_trainer"]["jpeg_warm_verify"] == (row["formats"]["jpeg"]["read_s"]["warm_verify"]
                                                            / row["trainer"]["img_s"])
    assert set(row["jpeg_over_raw"]) == {"write", "read_warm", "read_cold", "bytes"}
    # A raw shard holds exactly the synthetic pixels (plus .npy headers and records) and reads back bit for
    # bit; JPEG is lossy, and says by how much; PNG came back bit for bit.
    raw, jpeg = row["formats"]["raw"], row["formats"]["jpeg"]
    assert row["image_bytes"] <= raw["bytes_per_image"] < 1.2 * row["image_bytes"] and raw["exact"] is True
    assert raw["bits_per_pixel"] >= 24 and jpeg["exact"] is False and 0 < jpeg["psnr_db"] < float("inf")
    assert row["webdataset_png"]["lossless"] is True and res["summary"]["png_lossless"] is True
    assert res["meta"]["filesystem"] and res["meta"]["cpu_count"] >= 1 and res["meta"]["date"]
    assert res["meta"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert out.with_suffix(".png").stat().st_size > 0
    assert not list(tmp_path.glob(".cache-bench-*"))  # the temporary cache and tars are removed
    assert "R = 32" in proc.stdout and "raw .npy, CRC verify" in proc.stdout and "jpeg .npy, CRC verify" in proc.stdout
    assert "webdataset PNG tar" in proc.stdout and "jpeg / raw" in proc.stdout
