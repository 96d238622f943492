"""A real producer process (tiny stub diffuser) feeding the ring: pairs arrive intact."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_variation

from onlinemix.core.config import Config, load_config
from onlinemix.core.schedule import EpochSchedule, variation_seed
from onlinemix.data import load_real_images
from onlinemix.exchange.ring import PairRing, S, TrainerPort
from onlinemix.generation import worker as worker_module
from onlinemix.generation.generator import make_generator
from onlinemix.generation.producer import OnlineJob, ProducerPool
from onlinemix.generation.worker import WorkerDied, WorkerSpec, worker_main
from onlinemix.training.metrics import RunMetrics


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    # output_dir under tmp_path: the producers' disk cache (<output_dir>/cache) must not land in the checkout
    return load_config(None, {"generator.batch_size": "8", "ring.slots": "64", "train.batch_size": "32",
                              "producer.max_restarts": "1", "output_dir": str(tmp_path)})


def trainer_schedule(cfg: Config) -> EpochSchedule:
    """The schedule of one trainer rank with a batch of 32, which the producers follow."""
    return EpochSchedule(load_real_images(cfg.data).train_ids.numpy(), 32, cfg.train.seed)


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_pairs_from_a_producer_process_match_a_local_regeneration(cfg: Config, tmp_path: Path,
                                                                    no_leaked_segments) -> None:
    """Real half equals the dataset image, synthetic half equals the same generator run here
    with the seed the producer recorded: nothing is torn, swapped or shifted on the way."""
    real = load_real_images(cfg.data)
    schedule = EpochSchedule(real.train_ids.numpy(), 32, cfg.train.seed)
    ring = PairRing.create(cfg.ring.slots, cfg.data.resolution)
    pool = ProducerPool(cfg, ring, ["cpu"], schedule, tmp_path)
    try:
        pool.start()
        wait_until(lambda: (pool.check() or ring.header.generated) >= 24)
        positions = np.arange(24)
        ids = schedule.ids_at(positions)
        seeds = {int(ring.meta[s, S.real_id]): int(ring.meta[s, S.seed])
                 for s in np.flatnonzero(ring.meta[:, S.state] == 2)}
        out = np.zeros((24, 2, 3, 32, 32), dtype=np.uint8)
        result = ring.take(ids, positions, 0, out, max_reuse=1, max_age=1)
    finally:
        pool.stop()
        ring.close()
    assert result.found.all()
    assert np.array_equal(out[:, 0], real.images[torch.from_numpy(ids)].numpy())
    assert all(seeds[int(i)] == variation_seed(cfg.generator.seed, int(i), 0) for i in ids)
    torch.set_num_threads(1)
    generator = make_generator(cfg.generator, "cpu", cfg.data.resolution)
    expected = generator.generate(real.images[torch.from_numpy(ids)], [seeds[int(i)] for i in ids]).numpy()
    assert_same_variation(out[:, 1], expected)  # the producer generated in batches of another size
    assert not all(np.array_equal(out[0, 1], out[k, 1]) for k in range(1, 24))


def test_a_generator_that_cannot_load_is_final_and_named(cfg: Config, tmp_path: Path, no_leaked_segments) -> None:
    """Restarting cannot help a missing model directory: the pool raises at once with the generator's
    own message instead of spending producer.max_restarts on the same failure."""
    cfg.generator.model, cfg.producer.max_restarts = str(tmp_path / "no-such-model"), 3
    ring = PairRing.create(cfg.ring.slots, cfg.data.resolution)
    pool = ProducerPool(cfg, ring, ["cpu"], trainer_schedule(cfg), tmp_path)
    try:
        pool.start()
        with pytest.raises(WorkerDied) as e:
            wait_until(lambda: pool.check() or False)
    finally:
        pool.stop()
        ring.close()
    assert pool.restarts == 0
    assert str(e.value).startswith(f"producer 0 (pid {pool.procs[0].pid}) failed before it was ready, so it is not "
                                   "restarted (traceback in producer-0.log): ")
    assert str(e.value).endswith(f"generator.model {tmp_path / 'no-such-model'}: no such directory (a local model is "
                                 "a directory with model_index.json; a hub id looks like "
                                 "lambdalabs/sd-image-variations-diffusers)")
    assert "Traceback" in (tmp_path / "producer-0.log").read_text()


def test_a_stuck_producer_is_reported_once_counted_and_restarted(cfg: Config, tmp_path: Path, caplog,
                                                                 no_leaked_segments) -> None:
    """SIGSTOP stands for a hung GPU call: the process lives, its loop no longer turns."""
    cfg.producer.stuck_s = 1.0
    ring = PairRing.create(cfg.ring.slots, cfg.data.resolution)
    pool = ProducerPool(cfg, ring, ["cpu"], trainer_schedule(cfg), tmp_path)
    try:
        pool.start()
        pool.check()
        wait_until(lambda: ring.producer_progress(0) > 0)  # loaded; its loop turns (idle, with no trainer)
        pool.check()  # the pool has seen it turn: from now on it is watched
        stopped = pool.procs[0].pid
        os.kill(stopped, signal.SIGSTOP)
        wait_until(lambda: pool.check() or pool.stalls == 1, timeout=30)
        assert f"producer 0 (pid {stopped}) has made no progress for" in caplog.text and pool.restarts == 0
        wait_until(lambda: pool.check() or pool.restarts == 1, timeout=30)
        assert pool.stalls == 1 and caplog.text.count("has made no progress") == 1  # reported once
        assert f"producer 0 (pid {stopped}) made no progress for" in caplog.text
        assert pool.procs[0].pid != stopped and pool.procs[0].is_alive()
        metrics = RunMetrics(tmp_path / "metrics.jsonl", TrainerPort(ring, leader=True), pool)
        metrics.record(1, 0, {"fresh": 0, "cached": 0, "disk": 0, "fallback": 1, "mean_age": 0.0,
                              "mean_reuse": 0.0, "wait_s": 0.0}, 0.0, True)
        metrics.close()
    finally:
        pool.stop()
        ring.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (row["producer_stalls"], row["producer_restarts"]) == (1, 1)


def _kill_and_reap(pool: ProducerPool) -> int:
    pid = pool.procs[0].pid
    pool.procs[0].kill()
    pool.procs[0].join(30)
    return pid


def test_dead_producer_is_restarted_until_the_budget_is_spent(cfg: Config, tmp_path: Path, caplog,
                                                              no_leaked_segments) -> None:
    ring = PairRing.create(cfg.ring.slots, cfg.data.resolution)
    pool = ProducerPool(cfg, ring, ["cpu"], trainer_schedule(cfg), tmp_path)
    try:
        pool.start()
        wait_until(lambda: (pool.check() or ring.header.ready_producers) == 1)
        # a preemption's SIGTERM reaches the whole process group; it is the trainer's to act on
        os.kill(pool.procs[0].pid, signal.SIGTERM)
        time.sleep(0.5)
        assert pool.procs[0].is_alive() and pool.restarts == 0
        first = _kill_and_reap(pool)
        pool.check()  # producer.max_restarts=1: restarted, training would go on
        assert pool.restarts == 1 and pool.procs[0].pid != first and pool.procs[0].is_alive()
        assert f"producer 0 (pid {first}) died: killed by signal SIGKILL" in caplog.text
        wait_until(lambda: ring.header.ready_producers == 2)  # the new producer works
        second = _kill_and_reap(pool)
        with pytest.raises(WorkerDied, match=rf"producer 0 \(pid {second}\) died: killed by signal SIGKILL.*budget"):
            pool.check()
    finally:
        pool.stop()
        ring.close()


def test_a_worker_makes_its_device_current_before_anything_else(cfg: Config, monkeypatch) -> None:
    """Before its log, its data or its generator: diffusers' xformers probe allocates on the current
    device, which is cuda:0 (a trainer's GPU) until set. (No GPU here: the call into torch.cuda is
    recorded and ends the worker there.)"""
    class Selected(BaseException):
        pass

    calls = []

    def set_device(device) -> None:
        calls.append(f"set_device {device}")
        raise Selected

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(worker_module, "_die_with_parent", lambda: calls.append("die_with_parent"))
    monkeypatch.setattr(worker_module, "_setup_logging", lambda spec: calls.append("logging"))
    spec = WorkerSpec(0, cfg, "cuda:2", os.getpid(), None, OnlineJob("unused", EpochSchedule(np.arange(64), 32, 0)))
    with pytest.raises(Selected):
        worker_main(spec, None)
    assert calls == ["die_with_parent", "set_device cuda:2"]
