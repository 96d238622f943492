"""Every method end to end through `python -m onlinemix.train`, DINO + MixDiff with the stub
producer, and a DINO resume that restores the EMA teacher (kept outside DDP and the model file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_training
from safetensors.torch import load_file

from onlinemix.core.registry import METHODS
from onlinemix.train import run

# 10% of the digits train (144 images): 4 steps of 32 per epoch, so each run takes seconds.
SMALL = ["--train.batch-size", "32", "--data.holdout-fraction", "0.9", "--train.width", "8",
         "--probe.epochs", "5", "--train.epochs", "1"]
STEPS = round(1797 * 0.1) // 32


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS.names())
def test_each_method_trains_on_real_pairs(tmp_path: Path, method: str) -> None:
    proc = run_training("--train.method", method, "--train.pairing", "real", "--gen-gpus", "0", *SMALL,
                        "--output-dir", str(tmp_path), "--run-name", method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / method
    assert (run_dir / "backbone.safetensors").is_file() and (run_dir / "probe.json").is_file()
    rows = [r for r in _metrics(run_dir) if "step" in r]
    assert rows[-1]["step"] == STEPS and all(r["loss"] == r["loss"] for r in rows)


def test_dino_mixdiff_with_the_stub_producer(tmp_path: Path, no_leaked_segments) -> None:
    proc = run_training("--train.method", "dino", "--gen-gpus", "1", "--generator.model", "stub", *SMALL,
                        "--output-dir", str(tmp_path),
                        "--run-name", "dino-mixdiff")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "dino-mixdiff"
    assert (run_dir / "backbone.safetensors").is_file() and (run_dir / "producer-0.log").is_file()
    last = [r for r in _metrics(run_dir) if "step" in r][-1]
    assert last["step"] == STEPS
    assert last["total_fresh"] + last["total_cached"] + last["total_fallback"] == STEPS * 32


def test_dino_resume_restores_the_teacher(tmp_path: Path) -> None:
    common = ["--train.method", "dino", "--train.pairing", "real", "--gen-gpus", "0", *SMALL,
              "--probe.enabled", "false", "--output-dir", str(tmp_path), "--dino.momentum", "0.5"]
    run([*common, "--run-name", "r"])
    checkpoint = tmp_path / "r" / "checkpoints" / f"step-{STEPS}"
    teacher_file = checkpoint / "custom_checkpoint_0.pkl"
    saved = torch.load(teacher_file, weights_only=True)
    model = load_file(checkpoint / "model.safetensors")
    assert not any(k.startswith("teacher") for k in model), "the teacher must not be in the DDP model's file"
    # The EMA has moved the teacher away from the student's initial weights and from the student.
    key = next(k for k in saved if k.startswith("net.backbone.") and k.endswith("weight"))
    assert not torch.equal(saved[key], model[key.removeprefix("net.")])
    # Nothing left to train: the re-saved teacher must be exactly the loaded one (a teacher that
    # was not restored would be a fresh copy of the initial student).
    run(["--resume", str(tmp_path / "r")])
    again = torch.load(teacher_file, weights_only=True)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_dino_trains_on_two_ddp_ranks(tmp_path: Path) -> None:
    """Two gloo ranks: the student is DDP-wrapped, the teacher (outside DDP) follows it by EMA on each rank."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "onlinemix.train",
         "--train.method", "dino", "--train.pairing", "real", "--gen-gpus", "0", *SMALL,
         "--train.batch-size", "16", "--probe.enabled", "false", "--output-dir", str(tmp_path), "--run-name", "ddp"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "backbone.safetensors").is_file()
    assert (tmp_path / "ddp" / "checkpoints" / f"step-{STEPS}" / "custom_checkpoint_0.pkl").is_file()
