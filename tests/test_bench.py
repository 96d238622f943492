"""Smoke test of bench/throughput.py: the quick run completes and reports sane, complete results.

Timings are never asserted: they depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"


def test_quick_benchmark_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())

    gen = res["generation"]["rows"]
    assert gen and all(r["wrapper_img_s"] > 0 and r["bare_img_s"] > 0 and r["overhead_ratio"] > 0 for r in gen)
    assert res["generation"]["best_img_s"] > 0
    assert res["training"]["img_s"] > 0
    cost = res["step_cost"]  # MixDiff (pairs from a warm cache) and plain SimCLR, the same steps each
    assert all(len(cost["step_s"][k]) == cost["steps"] and cost["parts_s_mean"][k]["lookup"] > 0
               for k in ("mixdiff", "simclr"))
    assert cost["mixdiff_over_simclr"] == cost["median_step_s"]["mixdiff"] / cost["median_step_s"]["simclr"]
    assert cost["parts_s_mean"]["mixdiff"]["aim"] > 0  # the trainers publish scores and noise levels
    step_target, claim_target = res["targets"]
    assert step_target["value"] == cost["mixdiff_over_simclr"] and step_target["status"] in ("PASS", "MISS")
    claims = res["claims"]  # an aimed claim spans the positions passed during a batch; an unaimed one a batch
    assert claims["aimed_span"] > claims["plain_span"] == 16 and claims["aimed_claim_s"] > 0
    assert claim_target["value"] == claims["aimed_share_of_batch"] and claim_target["status"] in ("PASS", "MISS")
    assert res["ring"]["ring_pairs_s"] > 0 and res["ring"]["numpy_pairs_s"] > 0

    split = res["split"]
    assert len(split["rows"]) == split["node_gpus"] - 1
    assert [r["gen"] + r["train"] for r in split["rows"]] == [split["node_gpus"]] * (split["node_gpus"] - 1)
    assert set(split["best_gen"]) == {str(r) for r in split["max_reuse"]}

    assert res["meta"]["device"] == "cpu" and res["meta"]["threads"] == 1
    assert out.with_suffix(".png").is_file() and out.with_suffix(".png").stat().st_size > 0
    assert "Generation" in proc.stdout and "Split of a" in proc.stdout and "Step cost" in proc.stdout


def test_help_explains_every_flag() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for flag in ("--device", "--threads", "--model", "--gen-batch-sizes", "--train-batch-size", "--node-gpus",
                 "--out", "--quick"):
        assert flag in proc.stdout
