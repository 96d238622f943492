"""Smoke test of bench/generate.py: the quick run completes and reports sane, complete results.

Timings are never asserted: they depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "generate.py"
FACTORS = ("dtype", "attention", "steps", "batch", "compile", "channels_last", "tiny_vae")


def test_quick_generation_benchmark_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())

    rows = res["rows"]
    assert rows
    for r in rows:  # every row says what it measured, measured or not
        assert all(f in r for f in FACTORS), r
        assert r["status"] in ("ok", "unavailable", "error"), r
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and any(r["factor"] == "baseline" for r in ok)
    for r in ok:
        assert r["img_s"] > 0 and r["bare_img_s"] > 0 and r["overhead"] > 0
        assert r["x_plain"] > 0 and r["flops_per_image"] > 0
        assert 0 < r["achieved_fraction"] < 1.5
    assert any(r["tiny_vae"] for r in ok), "the quick run exercises the tiny VAE option"
    # xformers is optional: a row for it is either measured or marked unavailable, never an error
    assert all(r["status"] in ("ok", "unavailable") for r in rows if r["attention"] == "xformers")

    plain = res["plain"]["rows"]
    assert plain and all(p["img_s"] > 0 and 0 < p["achieved_fraction"] < 1.5 for p in plain)
    assert {r["batch"] for r in ok} <= {p["batch"] for p in plain}  # every ratio has its plain call
    assert res["config"]["plain_steps"] == 50

    flops = res["flops"]
    assert flops["unet_call"] > 0 and flops["vae_decode"] > 0 and flops["clip_encode"] > 0
    assert all(v > 0 for v in res["peak"]["flop_s"].values())
    assert [t["status"] for t in res["targets"]][1:] == ["not measured here"] * 2  # GPU targets, on a CPU
    assert res["targets"][0]["status"] in ("PASS", "MISS")

    assert res["meta"]["device"] == "cpu" and res["meta"]["threads"] == 1
    assert out.with_suffix(".png").is_file() and out.with_suffix(".png").stat().st_size > 0
    assert "Targets" in proc.stdout and "Plain diffusers call" in proc.stdout


def test_help_explains_every_flag() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for flag in ("--model", "--full-size", "--resolution", "--guidance", "--device", "--threads", "--dtypes",
                 "--attentions", "--steps", "--batch-sizes", "--compile", "--channels-last", "--tiny-vae",
                 "--full-matrix", "--peak-tflops", "--quick", "--out"):
        assert flag in proc.stdout
