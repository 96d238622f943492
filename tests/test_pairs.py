"""Pair lookup under the staleness policies: bounded waiting, urgent requests, fallbacks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from onlinemix.cache import CacheReader, ShardWriter
from onlinemix.core.config import StalenessConfig
from onlinemix.exchange.lookup import PairSource
from onlinemix.exchange.ring import PairRing, S, TrainerPort
from onlinemix.generation.worker import WorkerDied

R = 8
IMAGES = torch.arange(4 * 3 * R * R, dtype=torch.int64).remainder(251).to(torch.uint8).view(4, 3, R, R)


@pytest.fixture
def ring(no_leaked_segments):
    r = PairRing.create(slots=8, resolution=R)
    yield r
    r.close()


def publish(ring: PairRing, real_id: int, position: int, value: int = 200) -> None:
    slot = ring.reserve(1, 0, 10)[0]
    checksum = ring.write(slot, IMAGES[real_id].numpy(), np.full((3, R, R), value, dtype=np.uint8))
    ring.publish(slot, real_id=real_id, position=position, seed=0, birth_epoch=0, checksum=checksum)


def source(ring: PairRing, policy: str, timeout_s: float, health=lambda: None) -> PairSource:
    return PairSource(TrainerPort(ring, leader=True),
                      StalenessConfig(max_reuse=1, max_age=4, policy=policy, wait_timeout_s=timeout_s),
                      IMAGES, verify=True, health_check=health)


def publish_later(ring: PairRing, delay_s: float, real_id: int, position: int) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), publish(ring, real_id, position)))
    thread.start()
    return thread


def test_short_wait_times_out_to_a_real_view_long_wait_gets_the_synthetic_one(ring: PairRing) -> None:
    ids, positions = np.array([0, 1]), np.array([0, 1])
    publish(ring, 0, 0)
    late = publish_later(ring, 1.0, real_id=1, position=1)
    short = source(ring, "wait", timeout_s=0.05).get(ids, positions, epoch=0)
    assert short.images.is_synthetic.tolist() == [True, False]  # still blocked when the short timeout ended
    assert torch.equal(short.images.other[1], IMAGES[1]) and short.stats["fallback"] == 1
    short.release()
    late.join()
    publish(ring, 0, 0)
    late = publish_later(ring, 1.0, real_id=1, position=1)
    long = source(ring, "wait", timeout_s=60.0).get(ids, positions, epoch=0)
    late.join()
    assert long.images.is_synthetic.tolist() == [True, True]  # unblocked by the producer, not by the timeout
    assert long.stats["fresh"] == 2 and long.stats["fallback"] == 0
    assert long.stats["wait_s"] < 60.0
    long.release()


def test_waiting_trainer_asks_producers_for_exactly_its_missing_positions(ring: PairRing) -> None:
    publish(ring, 0, 10)
    source(ring, "wait", timeout_s=0.01).get(np.array([0, 1, 2, 3]), np.array([10, 11, 12, 13]), epoch=0)
    assert (ring.header.urgent_start, ring.header.urgent_end) == (11, 14)


def test_real_policy_never_waits(ring: PairRing) -> None:
    batch = source(ring, "real", timeout_s=60.0).get(np.array([2, 3]), np.array([0, 1]), epoch=0)
    assert batch.stats["wait_s"] == 0.0 and batch.stats["fallback"] == 2
    assert torch.equal(batch.images.real, IMAGES[[2, 3]]) and torch.equal(batch.images.other, IMAGES[[2, 3]])
    assert ring.header.urgent_end == 0


def test_a_dead_producer_is_noticed_while_waiting(ring: PairRing) -> None:
    def health() -> None:
        raise WorkerDied("producer 0 (pid 1) died: exit code 1")

    with pytest.raises(WorkerDied):
        source(ring, "wait", timeout_s=60.0, health=health).get(np.array([0]), np.array([0]), epoch=0)


def test_batch_mixes_ring_pairs_and_fallbacks_in_order(ring: PairRing) -> None:
    publish(ring, 2, 1, value=77)
    batch = source(ring, "real", timeout_s=1.0).get(np.array([1, 2, 3]), np.array([0, 1, 2]), epoch=0)
    assert batch.images.is_synthetic.tolist() == [False, True, False]
    assert torch.equal(batch.images.real, IMAGES[[1, 2, 3]]) and batch.images.ids.tolist() == [1, 2, 3]
    assert (batch.images.other[1] == 77).all() and torch.equal(batch.images.other[[0, 2]], IMAGES[[1, 3]])
    assert batch.stats["mean_age"] == 0.0 and batch.stats["mean_reuse"] == 0.0
    batch.release()


def test_ring_pairs_are_gathered_into_the_batch_and_their_slots_pinned_until_released(ring: PairRing) -> None:
    publish(ring, 2, 0, value=77)
    with source(ring, "real", timeout_s=1.0).get(np.array([2]), np.array([0]), epoch=0) as batch:
        slot = int(batch.loans[0].slots[0])
        assert torch.equal(batch.images.real[0], torch.from_numpy(ring.pixels[slot, 0]))  # the ring's pair...
        assert torch.equal(batch.images.other[0], torch.from_numpy(ring.pixels[slot, 1]))
        assert batch.images.other.data_ptr() != ring.pixels[slot, 1].ctypes.data  # ...copied out of it
        assert ring.meta[slot, S.pins] == 1
        ring.header.trainer_pos = 10  # the trainers have passed the pair: evictable, but for the loan
        taken = ring.reserve(8, 0, 10)
        assert slot not in taken and len(taken) == 7
        ring.release(taken)
    assert ring.meta[slot, S.pins] == 0 and ring.meta[slot, S.uses] == 1
    assert slot in ring.reserve(1, 0, 10)  # max_reuse=1 reached: the slot is free again
    ring.pixels[slot] = 0  # a producer overwrites the slot: the batch keeps its own copy
    assert (batch.images.other[0] == 77).all() and torch.equal(batch.images.real[0], IMAGES[2])


def test_slots_are_given_back_when_the_wait_is_interrupted(ring: PairRing) -> None:
    publish(ring, 0, 0)

    def health() -> None:
        raise WorkerDied("producer 0 (pid 1) died: exit code 1")

    with pytest.raises(WorkerDied):
        source(ring, "wait", timeout_s=60.0, health=health).get(np.array([0, 1]), np.array([0, 1]), epoch=0)
    assert (ring.meta[:, S.pins] == 0).all()


def cache_with(tmp_path, real_id: int, value: int) -> CacheReader:
    writer = ShardWriter(tmp_path, "key", {"dataset": "test"}, R, shard_pairs=1, flush_s=3600.0)
    writer.add(real_id, 0, 0, np.full((3, R, R), value, dtype=np.uint8))
    return CacheReader(tmp_path, "key", R)


@pytest.mark.parametrize("policy, timeout_s, from_disk", [("cached", 60.0, True), ("wait", 0.05, True),
                                                         ("real", 60.0, False)])
def test_policies_turn_to_the_disk_cache_for_what_the_ring_lacks(ring: PairRing, tmp_path, policy: str,
                                                                  timeout_s: float, from_disk: bool) -> None:
    publish(ring, 0, 0, value=77)
    pairs = PairSource(TrainerPort(ring, leader=True),
                       StalenessConfig(max_reuse=1, max_age=4, policy=policy, wait_timeout_s=timeout_s),
                       IMAGES, verify=True, health_check=lambda: None, cache=cache_with(tmp_path, 1, 99))
    with pairs.get(np.array([0, 1, 2]), np.array([0, 1, 2]), epoch=0) as batch:
        assert (batch.images.other[0] == 77).all()  # the ring comes first
        assert batch.images.is_synthetic.tolist() == [True, from_disk, False]
        assert (batch.images.other[1] == 99).all() == from_disk
        assert torch.equal(batch.images.real, IMAGES[[0, 1, 2]])  # a disk view's real half: the images' own
        assert batch.stats["disk"] == int(from_disk) and batch.stats["fallback"] == 2 - int(from_disk)
        assert batch.stats["wait_s"] < 1.0


def test_offline_source_serves_only_from_the_cache(tmp_path) -> None:
    pairs = PairSource(None, StalenessConfig(policy="wait"), IMAGES, verify=True, health_check=lambda: None,
                       cache=cache_with(tmp_path, 3, 55))
    with pairs.get(np.array([3, 2]), np.array([0, 1]), epoch=5) as batch:
        assert batch.images.is_synthetic.tolist() == [True, False] and (batch.images.other[0] == 55).all()
        assert batch.stats["mean_age"] == 5.0 and batch.stats["wait_s"] == 0.0
