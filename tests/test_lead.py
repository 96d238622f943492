"""Producers generate where the trainers will be, so pairs are ready before they are asked for."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from onlinemix.core.config import load_config
from onlinemix.core.schedule import EpochSchedule
from onlinemix.data import load_real_images
from onlinemix.exchange.ring import PairRing, TrainerPort
from onlinemix.generation.producer import ProducerPool

BATCH = 32


def simulate_trainer(tmp_path: Path, rate: float, lead_factor: float, steps: int, gen_batch: int = 8) -> float:
    """A trainer that consumes BATCH positions at ``rate`` positions/s and never waits
    (policy 'real'); returns the fraction of requests a synthetic view was ready for."""
    # The random stub at the ring's 32 px: a batch of 32 costs a few trainer steps at 400 positions/s, which is
    # the premise of the lead test below (the bundled digits-tiny, at 8 px, can be faster than that).
    cfg = load_config(None, {"generator.model": "stub", "generator.steps": "2", "generator.batch_size": str(gen_batch),
                             "train.batch_size": str(BATCH),
                             "ring.slots": "512", "producer.lead_factor": str(lead_factor),
                             "output_dir": str(tmp_path)})  # the producers' disk cache stays in tmp_path
    real = load_real_images(cfg.data)
    schedule = EpochSchedule(real.train_ids.numpy(), BATCH, cfg.train.seed)
    ring = PairRing.create(cfg.ring.slots, cfg.data.resolution)
    pool = ProducerPool(cfg, ring, ["cpu"], schedule, tmp_path)
    trainers = TrainerPort(ring, leader=True)
    out = np.zeros((BATCH, 2, 3, 32, 32), dtype=np.uint8)
    try:
        pool.start()
        while trainers.ready_producers < 1:
            pool.check()
            time.sleep(0.05)
        found = 0
        trainers.publish_speed(BATCH, BATCH / rate)
        for step in range(steps):
            started = time.monotonic()
            positions = schedule.rank_positions(step, 0, BATCH)
            result = ring.take(schedule.ids_at(positions), positions, 0, out, max_reuse=1, max_age=0)
            trainers.publish_position((step + 1) * BATCH)  # as a trainer does once it has its batch
            found += int(result.found.sum())
            time.sleep(max(0.0, BATCH / rate - (time.monotonic() - started)))
            pool.check()
        return found / (steps * BATCH)
    finally:
        pool.stop()
        ring.close()


def test_pairs_are_ready_before_they_are_asked_for_when_generation_keeps_up(tmp_path: Path,
                                                                           no_leaked_segments) -> None:
    assert simulate_trainer(tmp_path, rate=60.0, lead_factor=1.2, steps=20) >= 0.9


def test_lead_turns_late_pairs_into_fresh_ones_when_generation_is_slower(tmp_path: Path,
                                                                         no_leaked_segments) -> None:
    # A producer batch takes longer than a trainer step: generated for where the trainer is
    # now, every pair arrives after the trainer has passed its batch.
    at_trainer = simulate_trainer(tmp_path, rate=400.0, lead_factor=0.0, steps=40, gen_batch=32)
    ahead = simulate_trainer(tmp_path, rate=400.0, lead_factor=1.2, steps=40, gen_batch=32)
    assert ahead > 0.15 and ahead > 2 * at_trainer, (ahead, at_trainer)

