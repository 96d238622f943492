"""The input pipeline: batches made ahead on a worker thread, in order, failures and stops handled."""

from __future__ import annotations

import threading
import time
import traceback

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from onlinemix.core.config import load_config
from onlinemix.data import load_real_images
from onlinemix.exchange.lookup import PairSource
from onlinemix.exchange.ring import PairRing, S, TrainerPort
from onlinemix.train import Trainer
from onlinemix.training.prefetch import Prefetcher, Prepared, check_running
from onlinemix.views.compose import Views


def made(step: int) -> Prepared:
    return Prepared(step, Views([torch.full((1, 3, 2, 2), float(step))], 1), {"step": step}, [])


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_steps_arrive_in_order_made_on_the_worker_thread_unless_depth_is_0(depth: int) -> None:
    threads = []

    def prepare(step: int) -> Prepared:
        threads.append(threading.current_thread())
        return made(step)

    pipeline = Prefetcher(prepare, 5, 12, depth, threading.Event())
    try:
        assert [pipeline.next()[0].step for _ in range(7)] == list(range(5, 12))
    finally:
        pipeline.close()
    assert (threading.main_thread() in threads) == (depth == 0)
    assert len(threads) == 7


def test_a_failure_on_the_worker_surfaces_at_its_step_with_its_traceback() -> None:
    def failing(step: int) -> Prepared:
        if step == 2:
            raise KeyError("made on the worker")
        return made(step)

    pipeline = Prefetcher(failing, 0, 5, 2, threading.Event())
    try:
        assert [pipeline.next()[0].step for _ in range(2)] == [0, 1]
        with pytest.raises(KeyError, match="made on the worker") as failure:
            pipeline.next()
        assert "failing" in [frame.name for frame in traceback.extract_tb(failure.value.__traceback__)]
    finally:
        pipeline.close()


def test_close_stops_a_worker_that_is_waiting_for_a_pair() -> None:
    stop = threading.Event()
    entered = threading.Event()

    def waiting(step: int) -> Prepared:
        entered.set()
        while True:  # a trainer waiting for a producer: the lookup's waits call check_running
            check_running(stop)
            time.sleep(0.001)

    pipeline = Prefetcher(waiting, 0, 3, 2, stop)
    assert entered.wait(10)
    pipeline.close()
    assert not pipeline._thread.is_alive()


def test_the_next_batch_is_made_while_the_loop_works_and_the_wait_is_measured() -> None:
    def slow(step: int) -> Prepared:
        time.sleep(0.05)
        return made(step)

    pipeline = Prefetcher(slow, 0, 2, 2, threading.Event())
    try:
        _, first_wait = pipeline.next()
        time.sleep(0.2)  # the step: meanwhile the worker makes the next batch
        _, second_wait = pipeline.next()
    finally:
        pipeline.close()
    assert first_wait > 0.02 and second_wait < first_wait


def test_the_trainer_gives_ring_slots_back_before_the_step(tmp_path, no_leaked_segments) -> None:
    cfg = load_config(None, {"train.batch_size": "8", "train.width": "4", "data.resolution": "16",
                             "ring.slots": "64", "generator.batch_size": "8"})
    real = load_real_images(cfg.data)
    trainer = Trainer(cfg, Accelerator(cpu=True), tmp_path, real)
    ring = PairRing.create(64, real.size)
    try:
        positions = trainer.schedule.rank_positions(0, 0, 8)
        ids = trainer.schedule.ids_at(positions)
        for i, position in zip(ids.tolist(), positions.tolist(), strict=True):
            slot = ring.reserve(1, 0, 4)[0]
            checksum = ring.write(slot, real.images[i].numpy(), np.full((3, 16, 16), 7, dtype=np.uint8))
            ring.publish(slot, real_id=i, position=position, seed=0, birth_epoch=0, checksum=checksum)
        port = TrainerPort(ring, leader=True)
        pairs = PairSource(port, cfg.staleness, real.images, True, lambda: None)
        prepared = trainer.prepare(0, pairs, port, None)
        assert prepared.stats["fresh"] == 8 and (ring.meta[:, S.pins] == 0).all()  # no slot still pinned
        assert [tuple(v.shape) for v in prepared.views.images] == [(8, 3, 16, 16)] * 2
        assert ring.header.trainer_pos == 8  # the trainers have asked for this batch's positions
    finally:
        ring.close()


def test_the_worker_thread_makes_the_training_device_current_before_its_first_step(monkeypatch) -> None:
    """The current CUDA device is per thread and starts at cuda:0: a rank's pipeline thread that did not
    set it would open a context on rank 0's GPU. (No GPU here: the call into torch.cuda is recorded.)"""
    events = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", str(device),
                                                                                 threading.current_thread().name)))

    def prepare(step: int) -> Prepared:
        events.append(("prepare", step, threading.current_thread().name))
        return made(step)

    pipeline = Prefetcher(prepare, 0, 2, 2, threading.Event(), torch.device("cuda:3"))
    try:
        pipeline.next()
        pipeline.next()
    finally:
        pipeline.close()
    assert events[0] == ("set_device", "cuda:3", "onlinemix-prefetch")
    assert [e[0] for e in events[1:]] == ["prepare", "prepare"]
