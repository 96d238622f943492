"""Smoke test of bench/augment.py: the quick run completes, reports every backend's rate (triton only with CUDA),
judges every target and writes the JSON and the PNG. Timings are never asserted: they depend on the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "augment.py"


def test_quick_augment_benchmark_reports_every_rate(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent.parent,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["config"]["resolutions"] == [32] and res["meta"]["quick"] is True
    assert {r["recipe"] for r in res["rows"]} == {"mixdiff_real", "mixdiff_synthetic", "dino_multicrop",
                                                  "no_augmentation"}
    for row in res["rows"]:
        assert row["views_s"]["torchvision"] > 0 and row["views_s"]["torch"] > 0
        assert row["torch_over_torchvision"] == row["views_s"]["torch"] / row["views_s"]["torchvision"]
        assert row["views_s"]["compiled"] is None and row["auto"] == "torch"  # --quick compiles nothing (32 px)
        assert row["auto_over_torchvision"] == row["torch_over_torchvision"]
        assert (row["views_s"]["triton"] is None) == (not torch.cuda.is_available())
    dino = next(r for r in res["rows"] if r["recipe"] == "dino_multicrop")
    assert dino["views_per_image"] == 10
    statuses = [t["status"] for t in res["targets"]]
    assert len(statuses) == 4 and set(statuses) <= {"PASS", "MISS", "not measured here"}
    assert statuses[0] == "not measured here"  # the 224 px targets: not measured by a 32 px run
    assert statuses[1] in ("PASS", "MISS") and res["targets"][1]["value"] == min(
        r["auto_over_torchvision"] for r in res["rows"])
    assert res["meta"]["device_name"] and res["meta"]["date"] and res["config"]["dtype"] == "fp32"
    assert out.with_suffix(".png").stat().st_size > 0
    assert f"{statuses[1]:<17} CPU, one core: auto's backend not slower than torchvision" in proc.stdout
    if not torch.cuda.is_available():
        assert "triton      not measured here" in proc.stdout


def test_without_matplotlib_the_json_is_written_and_the_plot_skipped(tmp_path: Path) -> None:
    """matplotlib is only in the extras: a benchmark without it still saves every measurement."""
    blocker = tmp_path / "blocked" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib blocked for this test')\n")
    out = tmp_path / "a.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--recipes", "no_augmentation",
                           "--dtype", "bf16", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=SCRIPT.parent.parent, env={**os.environ, "TQDM_DISABLE": "1",
                                                         "PYTHONPATH": str(blocker.parent)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["plot"] is None and not out.with_suffix(".png").exists()
    assert res["config"]["dtype"] == "bf16" and res["rows"][0]["views_s"]["torch"] > 0
    assert "WARNING: matplotlib is not installed: no plot" in proc.stderr
