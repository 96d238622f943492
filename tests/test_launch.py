"""Launches: producer placement against what the launcher gives a node, two nodes on one machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from onlinemix.core.config import ConfigError, load_config
from onlinemix.core.devices import DeviceError, NodeLaunch, producer_devices, shared_with_trainers
from onlinemix.core.schedule import EpochSchedule
from onlinemix.data import load_real_images, select_train_ids
from onlinemix.train import main as train_main
from onlinemix.train import run

# ------------------------------------------------------------------ producer placement (pure, no GPU needed)


def node(visible: int, trainers: int, cvd: str | None = None, launcher: str = "accelerate") -> NodeLaunch:
    return NodeLaunch(visible, cvd, trainers, launcher)


@pytest.mark.parametrize("visible,trainers,gen_gpus,expected", [
    (8, 6, 2, ["cuda:6", "cuda:7"]),
    (8, 4, 2, ["cuda:4", "cuda:5"]),        # spare GPUs stay unused
    (2, 1, 1, ["cuda:1"]),
    (0, 2, 3, ["cpu", "cpu", "cpu"]),       # no CUDA: every producer on the CPU
    (4, 4, 0, []),
])
def test_producers_take_the_gpus_after_the_trainers(visible, trainers, gen_gpus, expected) -> None:
    assert producer_devices(node(visible, trainers), gen_gpus, []) == expected


def test_too_few_gpus_names_the_count_and_every_fix() -> None:
    with pytest.raises(DeviceError) as e:
        producer_devices(node(8, 7, launcher="torchrun"), 2, [])
    message = str(e.value)
    assert "7 trainer rank(s) on this node take cuda:0..cuda:6" in message and "needs 9 GPUs, but 8" in message
    assert "lower gen_gpus to 1" in message and "--gen-devices" in message
    assert "CUDA_VISIBLE_DEVICES" not in message  # not set: not the cause


def test_accelerate_num_processes_taking_every_gpu_says_how_many_trainers_fit() -> None:
    """An accelerate config with num_processes = every GPU of the node leaves none for the producers."""
    with pytest.raises(DeviceError) as e:
        producer_devices(node(8, 8), 2, [])
    message = str(e.value)
    assert "start 6 trainer process(es) per node with accelerate launch --num_processes" in message
    assert "lower gen_gpus" not in message  # no GPU is left over for any producer


def test_one_gpu_for_a_trainer_and_a_producer_points_to_gen_devices() -> None:
    with pytest.raises(DeviceError) as e:
        producer_devices(node(1, 1, launcher="python"), 1, [])
    message = str(e.value)
    assert message.endswith("needs 2 GPUs, but 1 GPU(s) are visible; place the producers yourself with "
                            "--gen-devices (e.g. --gen-devices cuda:0, sharing a trainer's GPU)")
    assert "trainer process(es)" not in message and "lower gen_gpus" not in message


def test_cuda_visible_devices_subset_is_named_as_the_cause() -> None:
    with pytest.raises(DeviceError) as e:
        producer_devices(node(2, 2, cvd="0,1", launcher="torchrun"), 2, [])
    message = str(e.value)
    assert "CUDA_VISIBLE_DEVICES=0,1" in message and "list 4 GPUs in CUDA_VISIBLE_DEVICES" in message


def test_accelerate_gpu_ids_overlapping_the_producers_names_gpu_ids() -> None:
    """accelerate's gpu_ids become CUDA_VISIBLE_DEVICES: 4 listed, 4 trainers, nothing left for 2 producers."""
    with pytest.raises(DeviceError) as e:
        producer_devices(node(4, 4, cvd="0,1,2,3"), 2, [])
    message = str(e.value)
    assert "accelerate sets it from gpu_ids" in message and "list 6 GPUs in gpu_ids in the accelerate config" in message


def test_explicit_devices_may_share_a_trainer_gpu() -> None:
    one_gpu = node(1, 1)
    assert producer_devices(one_gpu, 1, ["cuda:0"]) == ["cuda:0"]
    assert shared_with_trainers(one_gpu, ["cuda:0"]) == ["cuda:0"]
    # Odd layouts: producers on the last two GPUs, two on one GPU, one on the CPU; gen_gpus does not count.
    assert producer_devices(node(8, 6), 1, ["cuda:6", "cuda:7", "cuda:7", "cpu"]) == ["cuda:6", "cuda:7", "cuda:7", "cpu"]
    assert shared_with_trainers(node(8, 6), ["cuda:6", "cuda:7"]) == []


@pytest.mark.parametrize("visible,cvd,devices,expected", [
    (2, "4,5", ["cuda:2"], "cuda:0..cuda:1 (counted within CUDA_VISIBLE_DEVICES"),
    (0, None, ["cuda:0"], "no CUDA device is visible"),
])
def test_explicit_devices_that_do_not_exist(visible, cvd, devices, expected) -> None:
    with pytest.raises(DeviceError, match=expected.replace("(", r"\(")):
        producer_devices(node(visible, 1, cvd=cvd), 1, devices)


def test_gen_devices_syntax_and_count_are_checked_with_the_config() -> None:
    with pytest.raises(ConfigError, match="'gpu1' is not a device"):
        load_config(None, {"gen_devices": "cuda:0,gpu1"})
    cfg = load_config(None, {"gen_devices": "cuda:0, cuda:0", "gen_gpus": "0"})
    assert cfg.producer_device_list() == ["cuda:0", "cuda:0"] and cfg.producers == 2
    with pytest.raises(ConfigError, match="gen_gpus=0 is not allowed"):  # K = 0 with a pairing that needs views
        load_config(None, {"gen_gpus": "0", "train.pairing": "synthetic"})
    with pytest.raises(ConfigError, match=r"ring.slots=40 .* \(3 producer\(s\)\): need at least 176"):
        load_config(None, {"gen_devices": "cpu,cpu,cpu", "ring.slots": "40"})


def test_a_device_error_stops_training_before_it_starts(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:  # this machine has no CUDA device
        train_main(["--gen-devices", "cuda:0", "--output-dir", str(tmp_path)])
    assert str(e.value.code).startswith("config error: gen_devices names cuda:0, but no CUDA device is visible")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ two nodes on one machine

TINY = ["--train.batch-size", "32", "--data.resolution", "16", "--data.real-fraction", "0.1",
        "--probe.knn-every", "0", "--probe.enabled", "false", "--generator.batch-size", "8", "--generator.steps", "2",
        "--ring.slots", "128", "--train.width", "8", "--train.log-every", "1", "--run-name", "two"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(tmp_path: Path, *args: str) -> list[subprocess.Popen]:
    """Two torchrun launches (one trainer rank each) over gloo on loopback, with run directories
    (and caches) of their own: nodes that share no filesystem."""
    port = free_port()
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1",
         "-m", "onlinemix.train", "--output-dir", str(tmp_path / f"node{rank}"), *TINY, *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in (0, 1)]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return out


def cached_pairs(cache_dir: Path) -> list[tuple[int, int]]:
    """(image id, epoch) of every variation in a cache."""
    return [(i, e) for record in cache_dir.glob("*/index/*.json")
            for i, e in zip(json.loads(record.read_text())["ids"], json.loads(record.read_text())["epochs"], strict=True)]


def test_two_nodes_each_with_its_own_ring_and_producer_train_one_model(tmp_path: Path, no_leaked_segments) -> None:
    # Two steps in all: batches wait for their views (the default never does), so each node's pairs reach it.
    results = finish(start_nodes(tmp_path, "--train.epochs", "1", "--staleness.policy", "wait"), timeout=240)
    assert [code for code, _ in results] == [0, 0], "\n".join(stderr[-3000:] for _, stderr in results)
    main, other = tmp_path / "node0" / "two", tmp_path / "node1" / "two"
    # The main process's files on node 0; each node's own ring and producer files, numbered apart.
    assert (main / "backbone.safetensors").is_file() and (main / "metrics.jsonl").is_file()
    assert not (other / "metrics.jsonl").exists() and not (other / "producer-0.log").exists()
    assert (main / "producer-0.json").is_file() and (other / "producer-1.json").is_file()
    rings = [(main / ".ring-node0").read_text(), (other / ".ring-node1").read_text()]
    assert rings[0] != rings[1]
    # Each node's producer generated for its own node's trainers only: node n's slice of every global batch.
    cfg = load_config(None, {"data.real_fraction": "0.1"})
    train_ids = select_train_ids(load_real_images(cfg.data, cfg.store_root()), cfg.data).numpy()
    rows = [json.loads(line) for line in (main / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert rows[-1]["step"] == len(train_ids) // 64 and rows[-1]["total_fresh"] > 0  # global batch: 2 nodes x 32
    for rank in (0, 1):
        schedule = EpochSchedule(train_ids, 64, cfg.train.seed, node=rank, nodes=2)
        generated = cached_pairs(tmp_path / f"node{rank}" / "cache")
        assert generated
        for epoch in {e for _, e in generated}:
            positions = np.arange(epoch * schedule.positions_per_epoch, (epoch + 1) * schedule.positions_per_epoch)
            served = set(schedule.ids_at(positions).tolist())
            assert len(served) == schedule.positions_per_epoch == len(train_ids) // 64 * 32
            assert {i for i, e in generated if e == epoch} <= served


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process that is not a zombie."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def _alive() -> set[int]:
    return set(_parents())


def _children(pid: int) -> set[int]:
    """``pid`` and its live descendants."""
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        found |= frontier
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
    return found & set(parents)


def test_a_trainer_rank_killed_on_one_node_stops_the_other_node(tmp_path: Path, no_leaked_segments) -> None:
    """SIGKILL of node 1's trainer rank: node 0's rank, both producers and both launchers end, bounded in time,
    and no ring is left (node 1's goes with its creator's resource tracker)."""
    procs = start_nodes(tmp_path, "--train.epochs", "50", "--staleness.policy", "real")
    try:
        deadline = time.monotonic() + 180
        metrics = tmp_path / "node0" / "two" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text()):
            assert all(p.poll() is None for p in procs), finish(procs, 10)
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        job = _children(procs[0].pid) | _children(procs[1].pid)
        producer = json.loads((tmp_path / "node0" / "two" / "producer-0.json").read_text())["pid"]
        assert producer in job
        trainer = [pid for pid in _children(procs[1].pid) if b"onlinemix.train" in
                   Path(f"/proc/{pid}/cmdline").read_bytes() and pid != procs[1].pid
                   and b"torch.distributed.run" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(trainer) == 1, trainer
        os.kill(trainer[0], signal.SIGKILL)
        codes = finish(procs, timeout=120)
        assert all(code != 0 for code, _ in codes)
        deadline = time.monotonic() + 30
        while job & _alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not job & _alive(), "processes of the job outlived it"
    finally:
        finish(procs, timeout=1)


# ------------------------------------------------------------------ trackers and the run summary


def test_tensorboard_gets_the_metrics_and_the_run_ends_with_a_summary(tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(["--train.pairing", "real", "--gen-gpus", "0", "--train.epochs", "2", "--train.log-every", "1",
         "--report-to", "tensorboard", "--output-dir", str(tmp_path), "--run-name", "tb", *TINY[:6],
         "--probe.enabled", "false", "--probe.knn-every", "0", "--train.width", "8"])
    run_dir = tmp_path / "tb"
    events = EventAccumulator(str(run_dir)).Reload()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "step" in row]
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [row["step"] for row in steps] and len(loss) == 2 * (len(steps) // 2) >= 2
    assert [round(e.value, 4) for e in loss] == [round(row["loss"], 4) for row in steps]
    for tag in ("data_wait_share", "total_fresh", "total_fallback", "lr", "epoch/data_wait_share", "epoch/fallback"):
        assert tag in events.Tags()["scalars"], tag
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps[-1]["step"] and summary["producer_images_per_s"] is None
    assert summary["views"] == {k: steps[-1][f"total_{k}"] for k in ("fresh", "cached", "disk", "fallback")}
    assert summary["trainer_images_per_s"] > 0
    assert Path(summary["checkpoint"]) == run_dir / "checkpoints" / f"step-{summary['steps']}"
    assert "run summary" in capsys.readouterr().out


def test_report_to_none_writes_no_event_file(tmp_path: Path) -> None:
    run(["--train.pairing", "real", "--gen-gpus", "0", "--train.epochs", "1", "--report-to", "none",
         "--output-dir", str(tmp_path), "--run-name", "plain", *TINY[:6], "--probe.enabled", "false",
         "--probe.knn-every", "0", "--train.width", "8"])
    assert (tmp_path / "plain" / "metrics.jsonl").is_file() and (tmp_path / "plain" / "summary.json").is_file()
    assert not list((tmp_path / "plain").glob("**/events.out.tfevents.*"))
