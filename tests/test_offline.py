"""Cache-warm offline training: an online run fills the cache, then runs with no producer train from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, run_training, train_command

from onlinemix.cache import CacheReader, cache_key

FAST = ["--train.batch-size", "64", "--probe.epochs", "20", "--train.epochs", "1", "--data.resolution", "16",
        "--probe.knn-every", "0"]
TRAIN_IMAGES = 1438  # bundled digits minus the 20% probe hold-out
STEPS = TRAIN_IMAGES // 64


def last_row(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r][-1]


def test_online_run_caches_every_pair_then_offline_runs_train_from_the_cache_alone(tmp_path: Path,
                                                                                    no_leaked_segments) -> None:
    common = ["--output-dir", str(tmp_path), *FAST]
    online = run_training("--run-name", "online", "--cache.shard-pairs", "32", *common)
    assert online.returncode == 0, online.stderr[-3000:]
    fingerprint = json.loads((tmp_path / "online" / "producer-0.json").read_text())["fingerprint"]
    cache = CacheReader(tmp_path / "cache", cache_key(fingerprint, "digits"), 16)
    served = last_row(tmp_path / "online")
    assert len(cache) >= served["total_fresh"] > 0  # every pair that reached the trainer is on disk
    covered = int(cache.coverage(range(1797)).sum())
    assert covered < TRAIN_IMAGES  # the epoch's dropped last partial batch was never generated

    refused = run_training("--run-name", "refused", "--offline", "--gen-gpus", "0", "--cache.min-coverage", "1",
                           *common)
    assert refused.returncode != 0
    assert f"{TRAIN_IMAGES - covered} of {TRAIN_IMAGES} training images have no intact cached variation" in refused.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()

    # Another data order (seed 1) also draws the images the online epoch left out (the last partial batch).
    offline = run_training("--run-name", "offline", "--offline", "--gen-gpus", "0", "--cache.min-coverage", "0",
                           "--train.seed", "1", *common)
    assert offline.returncode == 0, offline.stderr[-3000:]
    run_dir = tmp_path / "offline"
    assert not list(run_dir.glob("producer-*")), "offline mode started a producer"
    row = last_row(run_dir)
    assert row["total_fresh"] == row["total_cached"] == 0  # no ring at all
    assert row["total_disk"] + row["total_fallback"] == STEPS * 64
    assert row["total_disk"] > 0 and row["total_fallback"] > 0  # uncovered images fell back to real views
    assert "checksum_errors" not in row  # no ring metrics offline


def test_an_unwritable_cache_directory_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("nothing can be created below a file, even by root")
    proc = run_training("--output-dir", str(tmp_path), "--run-name", "x", "--cache.dir", str(blocker / "cache"),
                        *FAST)
    assert proc.returncode != 0
    assert f"cache directory {blocker / 'cache'} is not writable" in proc.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("**/producer-*"))


def test_warm_then_offline_is_the_papers_precompute_then_train(tmp_path: Path) -> None:
    cache = ["--cache.dir", str(tmp_path / "cache")]
    warm = subprocess.run([sys.executable, "-m", "onlinemix.cache", "warm", "--producers", "1",
                           "--data.resolution", "16", *cache],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert warm.returncode == 0, warm.stderr[-3000:]
    offline = run_training("--output-dir", str(tmp_path), "--run-name", "offline", "--offline", *cache, *FAST)
    assert offline.returncode == 0, offline.stderr[-3000:]
    row = last_row(tmp_path / "offline")
    assert row["total_disk"] == STEPS * 64 and row["total_fallback"] == 0  # every image was warmed
    assert not list((tmp_path / "offline").glob("producer-*"))


def test_a_cache_that_stops_accepting_pairs_is_reported_on_the_console_in_metrics_and_summary(
        tmp_path: Path, no_leaked_segments) -> None:
    """Its shards folder replaced by a file once the producer runs: the producer goes on without caching,
    and the trainer's console, metrics.jsonl and run summary say so (it was in producer-0.log only)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(train_command("--output-dir", str(tmp_path), "--run-name", "r", "--cache.shard-pairs", "8",
                                          *FAST), cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (shards := list((tmp_path / "cache").glob("*/shards"))) or not (tmp_path / "r" / "metrics.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    shutil.rmtree(shards[0])
    shards[0].write_text("not a folder")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    said = f"producer 0: cache {shards[0].parent}: it cannot be written (Not a directory); new pairs are no longer cached"
    assert said in err and said in (tmp_path / "r" / "train.log").read_text()
    assert f"  notice       {said}" in out
    assert last_row(tmp_path / "r")["producer_notices"] == 1
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["notices"] == [said]
