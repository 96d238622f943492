"""Smoke test of bench/data.py: the quick run completes, writes every part of the JSON and the plot, and leaves
no temporary images or stores behind. Timings are never asserted: they depend on the machine and its load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "data.py"


def test_quick_data_benchmark_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--dir", str(tmp_path),
                           "--readers", "1,2"], capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["meta"]["quick"] is True and res["meta"]["date"] and res["config"]["readers"] == [1, 2]
    prepared = res["prepare"]
    assert prepared["same_bytes_any_worker_count"] is True
    assert prepared["raw_bytes_per_image"] == 3 * 224 * 224 and 0 < prepared["jpeg_bytes_per_image"] < 3 * 224 * 224
    assert all(prepared[k]["img_s"] > 0 for k in ("raw_one_worker", "raw_all_workers", "jpeg_all_workers"))
    assert res["memcpy"]["read_over_memcpy"] > 0 and res["memcpy"]["store_read_gb_s"] > 0
    assert set(res["loaders"]["dataloader_img_s_per_core"]) == {"raw_store", "jpeg_store", "imagefolder"}
    assert set(res["loaders"]["in_process_img_s"]) == {"raw_store", "jpeg_store"}
    opening = res["open"]
    assert (opening["small"]["images"], opening["large"]["images"]) == (160, 20_000)
    assert opening["small"]["files_opened"] == opening["large"]["files_opened"] == 1  # store.json, whatever N
    memory = res["memory"]["rows"]
    assert [r["readers"] for r in memory] == [1, 2]
    # every reader mapped the whole store, and the shared pages counted once between them
    assert all(min(r["rss_per_reader"]) >= 0.95 * res["memory"]["store_bytes"] for r in memory)
    assert all(r["growth_over_store"] < 1.5 for r in memory)
    assert len(res["targets"]) == 5 and all(t["status"] in ("PASS", "MISS") for t in res["targets"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert not list(tmp_path.glob(".data-bench-*"))
    assert "Targets" in proc.stdout and "RAW store read >= 0.5x a memcpy" in proc.stdout
