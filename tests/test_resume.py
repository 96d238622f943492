"""Exact resume: a run resumed from a mid-epoch checkpoint ends with the uninterrupted run's weights
(every method and pairing, offline from a warmed cache: the deterministic synthetic source); SIGTERM
stops a real run with a checkpoint and exit status 0; incomplete checkpoints are never chosen; a run
directory has one writer at a time."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, train_command
from safetensors.torch import load_file

from onlinemix.cache import writer_for
from onlinemix.core.config import ConfigError, load_config
from onlinemix.core.registry import METHODS, PAIRINGS
from onlinemix.data import load_real_images, select_train_ids
from onlinemix.generation.generator import make_generator
from onlinemix.generation.warm import RowsWork
from onlinemix.generation.worker import CacheSink, generate_loop
from onlinemix.train import run
from onlinemix.training.checkpoint import (
    COMPLETE_FILE,
    CheckpointSchedule,
    newest_checkpoint,
    prune,
    rank_state_file,
    resume_point,
)
from onlinemix.training.rundir import CheckpointError, RunDirInUse, hold_run_dir

# 45 training images (10% of the digits, a quarter of them) at 16 px; a tiny convnet on one thread.
DATA = {"data.resolution": "16", "data.holdout_fraction": "0.9", "data.real_fraction": "0.25"}
VARIATIONS = 2  # two per image: which one a step takes depends on the cache's use counts
BATCH = 12
STEPS_PER_EPOCH = 45 // BATCH


def tiny(cache: Path, out: Path, *extra: str) -> list[str]:
    return [*(f"--{k}={v}" for k, v in DATA.items()), "--train.width", "4", "--train.batch-size", str(BATCH),
            "--train.epochs", "2", "--train.cpu-threads", "1", "--probe.enabled", "false", "--probe.knn-every", "0",
            "--dino.local-crops", "2", "--offline", "--gen-gpus", "0", "--cache.dir", str(cache), "--output-dir", str(out),
            *extra]


@pytest.fixture(scope="session")
def warmed_cache(tmp_path_factory) -> Path:
    """Every training image's first two variations in a cache, generated in this process with the default
    generator and `cache warm`'s rows and seeds: what `python -m onlinemix.cache warm --variations 2` stores."""
    return warm(tmp_path_factory.mktemp("warmed") / "cache", VARIATIONS)


def warm(root: Path, variations: int, **generator: str) -> Path:
    """``variations`` variations of every training image in the cache at ``root``, made in this process."""
    cfg = load_config(None, {**DATA, "cache.dir": str(root), **{f"generator.{k}": v for k, v in generator.items()}})
    real = load_real_images(cfg.data, cfg.store_root())
    ids = select_train_ids(real, cfg.data).numpy()
    made_by = make_generator(cfg.generator, "cpu", real.size)
    rows = np.array([(i, k) for k in range(variations) for i in ids.tolist()], dtype=np.int64)
    sink = CacheSink(writer_for(cfg, made_by), required=True)
    generate_loop(made_by, real.images, RowsWork(rows, cfg.generator.batch_size, cfg.generator.seed,
                                                 threading.Event()), [sink], lambda: True)
    sink.close()
    return root


def checkpoint_state(step_dir: Path) -> dict:
    """What must match bit for bit: model, optimizer, registered objects (DINO's teacher and centre)."""
    return {p.name: load_file(p) if p.suffix == ".safetensors" else torch.load(p, weights_only=True)
            for p in sorted(step_dir.iterdir())
            if p.suffix in (".safetensors", ".bin", ".pkl") and not p.name.startswith("random_states")}


def bitwise_equal(a: object, b: object) -> bool:
    """Nested dicts and lists of tensors, equal in dtype and every bit (pickles of equal tensors may differ)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    return a == b


def counters(step_dir: Path) -> dict:
    state = json.loads((step_dir / rank_state_file(0)).read_text())
    return {"totals": state["metrics"]["totals"], "cache_uses": state["cache_uses"]}


def assert_same_end(a: Path, b: Path, steps: int) -> None:
    end_a, end_b = (run_dir / "checkpoints" / f"step-{steps}" for run_dir in (a, b))
    state = checkpoint_state(end_a)
    assert {"model.safetensors", "optimizer.bin"} <= state.keys()
    assert bitwise_equal(state, checkpoint_state(end_b))
    assert counters(end_a) == counters(end_b)
    assert (a / "backbone.safetensors").read_bytes() == (b / "backbone.safetensors").read_bytes()


@pytest.mark.parametrize("pairing", PAIRINGS.names())
@pytest.mark.parametrize("method", METHODS.names())
def test_resumed_from_mid_epoch_equals_the_uninterrupted_run(method: str, pairing: str, warmed_cache: Path,
                                                             tmp_path: Path) -> None:
    steps = 2 * STEPS_PER_EPOCH
    run(tiny(warmed_cache, tmp_path, "--train.method", method, "--train.pairing", pairing, "--run-name", "whole",
             "--train.checkpoint-every", "2", "--train.keep-checkpoints", "0"))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # The run as a kill after step 2 (mid-epoch 0) leaves it: its config and that checkpoint.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "config.yaml", resumed)
    shutil.copytree(whole / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    run(["--resume", str(resumed)])
    assert_same_end(whole, resumed, steps)
    if pairing not in ("real", "sequential"):  # an image drawn in both epochs got its other variation the 2nd time
        uses = counters(whole / "checkpoints" / f"step-{steps}")["cache_uses"]
        assert {n for _, _, n in uses} == {1} and len(uses) == steps * BATCH


def test_sigterm_mid_epoch_checkpoints_exits_0_and_resume_auto_equals_the_uninterrupted_run(
        warmed_cache: Path, tmp_path: Path) -> None:
    """A real process stopped by SIGTERM (paused first, so that the signal lands mid-run whatever the
    machine's load), then sent more SIGTERMs, writes a checkpoint at the step it was in and exits 0;
    ``--resume auto`` skips a newer checkpoint cut short and ends where the uninterrupted run ends."""
    args = tiny(warmed_cache, tmp_path, "--train.batch-size", "2", "--train.epochs", "1", "--train.log-every", "1")
    steps = 45 // 2
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_command(*args, "--run-name", "stopped"), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    for _ in range(5):  # a launcher and a scheduler both forward theirs: later ones change nothing
        time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    saved = newest_checkpoint(tmp_path / "stopped")
    assert 0 < saved.step < steps, "the run ended before the signal: nothing to resume"
    assert all((p / COMPLETE_FILE).is_file() for p in (tmp_path / "stopped" / "checkpoints").iterdir())
    assert (f"stopped by SIGTERM at step {saved.step} of {steps}, checkpoint saved; continue with: python -m "
            f"onlinemix.train --resume {tmp_path / 'stopped'}") in stderr
    assert "Traceback" not in stderr and not (tmp_path / "stopped" / "backbone.safetensors").exists()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == saved.step and "epoch_end" not in rows[-1]  # mid-epoch: no epoch row yet

    cut_short = saved.path.with_name(f"step-{saved.step + 1}")  # a save killed half-way, after the marker's files
    shutil.copytree(saved.path, cut_short)
    (cut_short / COMPLETE_FILE).unlink()
    run(["--resume", "auto", "--output-dir", str(tmp_path), "--run-name", "stopped"])
    run([*args, "--run-name", "whole"])
    assert_same_end(tmp_path / "whole", tmp_path / "stopped", steps)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"step"' in line]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[-1]["total_disk"] == steps * 2  # the totals went on from the checkpoint's


def complete(run_dir: Path, step: int, saved_at: float) -> Path:
    path = run_dir / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    (path / COMPLETE_FILE).write_text(json.dumps({"step": step, "saved_at": saved_at}))
    return path


def test_resume_chooses_the_newest_complete_checkpoint_and_skips_incomplete_ones(tmp_path: Path, caplog) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with pytest.raises(CheckpointError, match=r"--resume auto: no complete checkpoint in .*r; start the run without"):
        resume_point("auto", tmp_path, "r")  # it never started training
    (run_dir / "config.yaml").write_text("{}")
    assert resume_point("auto", tmp_path, "r") == (run_dir, None)  # it did, and saved nothing: from step 0
    with pytest.raises(CheckpointError, match=r"--resume auto: no complete checkpoint in any run directory"):
        resume_point("auto", tmp_path, "")
    older = complete(run_dir, 4, saved_at=100.0)
    newer = complete(run_dir, 2, saved_at=200.0)  # resumed from an older one: newest by time, not by step
    (run_dir / "checkpoints" / "step-9").mkdir()  # no marker: cut short
    (run_dir / "checkpoints" / ".step-12.tmp").mkdir()  # killed before its rename
    assert resume_point("auto", tmp_path, "r") == (run_dir, None)
    assert resume_point("auto", tmp_path, "") == (run_dir, None)  # any run in the output directory
    assert resume_point(str(run_dir), tmp_path, "") == (run_dir, None)
    assert resume_point(str(older), tmp_path, "") == (run_dir, older)
    with pytest.raises(CheckpointError, match=r"step-9: not a complete checkpoint \(no COMPLETE marker"):
        resume_point(str(run_dir / "checkpoints" / "step-9"), tmp_path, "")
    with caplog.at_level("WARNING"):
        assert newest_checkpoint(run_dir).path == newer
    assert "skipping incomplete checkpoint" in caplog.text and "step-9" in caplog.text and ".step-12.tmp" in caplog.text
    prune(run_dir, keep=1)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-9"]


def test_stop_and_time_based_saves_are_decided_after_a_step() -> None:
    from accelerate import Accelerator

    due = CheckpointSchedule(Accelerator(cpu=True), every=5, every_s=3600.0)
    assert due(1, stop_requested=False) == (False, False)
    assert due(5, stop_requested=False) == (True, False)  # every 5 steps
    assert due(6, stop_requested=True) == (True, True)  # a signal: save and stop
    due.every_s, due.last_save = 0.5, time.monotonic() - 1.0
    assert due(7, stop_requested=False) == (True, False)  # overdue by time
    due.saved()
    assert due(8, stop_requested=False) == (False, False)


def test_a_run_directory_taken_by_a_live_run_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Two runs (or two --resume) of one directory would write every metrics row twice."""
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    with hold_run_dir(run_dir):
        with pytest.raises(RunDirInUse, match=f"run directory {run_dir} is being written by the run of pid "
                                              f"{os.getpid()}"):
            run(["--output-dir", str(tmp_path), "--run-name", "taken", "--gen-gpus", "0", "--train.pairing", "real",
                 "--train.epochs", "1", "--probe.enabled", "false"])
    assert sorted(p.name for p in run_dir.iterdir()) == [".writer.lock"]


def test_a_killed_writer_does_not_hold_its_run_directory(tmp_path: Path) -> None:
    hold = ("import sys, time; from pathlib import Path; from onlinemix.training.rundir import hold_run_dir\n"
            "with hold_run_dir(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"pid {holder.pid} "):
            with hold_run_dir(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with hold_run_dir(tmp_path):  # the kernel dropped the dead process's lock
        pass


def test_resume_refuses_a_changed_shape_and_names_a_malformed_state(warmed_cache: Path, tmp_path: Path) -> None:
    """Settings that shape the checkpoint's state are checked before anything loads (they used to end in
    a size-mismatch or KeyError traceback), and a trainer_state.json of the wrong shape is named."""
    run(tiny(warmed_cache, tmp_path, "--run-name", "r", "--train.epochs", "1"))
    run_dir = tmp_path / "r"
    for flag, value, said in [("--train.width", "8", "train.width 4 -> 8"),
                              ("--train.method", "barlowtwins", "train.method 'simclr' -> 'barlowtwins'"),
                              ("--train.optimizer", "sgd", "train.optimizer 'adamw' -> 'sgd'")]:
        with pytest.raises(ConfigError, match=re.escape(f"--resume cannot change {said}: the checkpoint's")):
            run(["--resume", str(run_dir), flag, value])
    run(["--resume", str(run_dir), "--train.epochs", "2"])  # what the state is not shaped by may change
    saved = newest_checkpoint(run_dir)
    (saved.path / "trainer_state.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {saved.path / 'trainer_state.json'} holds "
                                                        f"no step count ([1, 2]); delete {saved.path}")):
        run(["--resume", str(run_dir)])


def test_offline_trains_from_the_generator_that_made_the_cache_and_records_it(tmp_path: Path) -> None:
    """The cache's generator, not the configured one, goes into config.yaml; another generator.model
    asked for is refused instead of being ignored."""
    cache = warm(tmp_path / "cache", 1, model="stub", steps="2")
    with pytest.raises(ConfigError, match="offline: generator.model=full-size-random, but the cached pairs for this "
                                          "dataset, resolution and guidance .* were made by stub"):
        run(tiny(cache, tmp_path, "--run-name", "refused", "--generator.model", "full-size-random"))
    run(tiny(cache, tmp_path, "--run-name", "adopted", "--train.epochs", "1"))
    recorded = load_config(tmp_path / "adopted" / "config.yaml").generator
    assert (recorded.model, recorded.steps) == ("stub", 2)
