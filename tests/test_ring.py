"""The shared-memory pair ring: integrity, staleness rules, dead writers, segment hygiene."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import zlib
from multiprocessing import shared_memory

import numpy as np
import pytest

from onlinemix.exchange import ring as ring_module
from onlinemix.exchange.ring import (
    READY,
    WRITING,
    PairRing,
    ProducerPort,
    RingError,
    RingHeader,
    S,
    TrainerPort,
    remove_stale_segments,
)

R = 8


def random_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (3, R, R), dtype=np.uint8), rng.integers(0, 256, (3, R, R), dtype=np.uint8))


def put(ring: PairRing, real_id: int, position: int = 0, epoch: int = 0, seed: int = 0) -> int:
    slot = ring.reserve(1, epoch, max_age=100)[0]
    real, synthetic = random_pair(seed)
    checksum = ring.write(slot, real, synthetic)
    ring.publish(slot, real_id=real_id, position=position, seed=seed, birth_epoch=epoch, checksum=checksum)
    return slot


def take(ring: PairRing, ids, positions, epoch=0, max_reuse=1, max_age=100):
    ids, positions = np.asarray(ids), np.asarray(positions)
    out = np.zeros((len(ids), 2, 3, R, R), dtype=np.uint8)
    return ring.take(ids, positions, epoch, out, max_reuse=max_reuse, max_age=max_age), out


@pytest.fixture
def ring(no_leaked_segments):
    r = PairRing.create(slots=8, resolution=R)
    yield r
    r.close()


def _child_writes(name: str, n: int) -> None:
    r = PairRing.attach(name)
    for i in range(n):
        put(r, real_id=i, position=i, seed=i)
    r.close()


def test_pairs_written_by_another_process_arrive_intact(ring: PairRing) -> None:
    child = mp.get_context("spawn").Process(target=_child_writes, args=(ring.name, 5))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    result, out = take(ring, [4, 0, 2], [4, 0, 2])
    assert result.found.all() and result.fresh.all()
    for row, real_id in enumerate([4, 0, 2]):
        real, synthetic = random_pair(real_id)
        assert np.array_equal(out[row, 0], real) and np.array_equal(out[row, 1], synthetic)


def test_attaching_process_exit_does_not_unlink_the_ring(ring: PairRing) -> None:
    # CPython issue 82300: an attaching process's resource tracker would unlink the segment.
    child = mp.get_context("spawn").Process(target=_child_writes, args=(ring.name, 1))
    child.start()
    child.join(60)
    other = PairRing.attach(ring.name)
    assert other.header.generated == 1
    other.close()


def test_corrupt_pair_is_detected_and_never_served(ring: PairRing) -> None:
    slot = put(ring, real_id=7)
    ring.pixels[slot, 1, 0, 0, 0] ^= 0xFF
    result, _ = take(ring, [7], [0])
    assert not result.found[0]
    assert ring.header.checksum_errors == 1
    assert ring.occupancy()["ready"] == 0


def test_max_reuse_bounds_how_often_a_view_serves(ring: PairRing) -> None:
    put(ring, real_id=3)
    served = [take(ring, [3], [10 * k], max_reuse=2)[0] for k in range(3)]
    assert [bool(r.found[0]) for r in served] == [True, True, False]
    assert [bool(r.fresh[0]) for r in served[:2]] == [True, False]
    assert ring.occupancy()["free"] == ring.slots


def test_repeated_ids_in_one_call_count_against_max_reuse(ring: PairRing) -> None:
    put(ring, real_id=3)
    assert take(ring, [3, 3, 3], [0, 1, 2], max_reuse=2)[0].found.tolist() == [True, True, False]
    assert not take(ring, [3], [3], max_reuse=2)[0].found[0]


def test_views_older_than_max_age_are_not_served(ring: PairRing) -> None:
    put(ring, real_id=1, epoch=0)
    assert not take(ring, [1], [0], epoch=3, max_age=2)[0].found[0]
    result, _ = take(ring, [1], [0], epoch=2, max_age=2)
    assert result.found[0] and result.age[0] == 2


def test_view_made_for_a_later_position_is_kept_for_it(ring: PairRing) -> None:
    put(ring, real_id=5, position=100)
    assert not take(ring, [5], [50])[0].found[0]
    assert take(ring, [5], [100])[0].found[0]


def test_freshest_acceptable_view_is_served_first(ring: PairRing) -> None:
    put(ring, real_id=2, position=0, seed=11)
    put(ring, real_id=2, position=5, seed=22)
    _, out = take(ring, [2], [9], max_reuse=3)
    assert np.array_equal(out[0, 1], random_pair(22)[1])


def _child_dies_mid_write(name: str) -> None:
    r = PairRing.attach(name)
    slot = r.reserve(1, 0, 100)[0]
    r.pixels[slot, 0] = 1  # half a pair, never published
    os.kill(os.getpid(), signal.SIGKILL)


def test_writer_killed_mid_write_is_never_served_and_its_slot_is_reclaimed(ring: PairRing) -> None:
    child = mp.get_context("spawn").Process(target=_child_dies_mid_write, args=(ring.name,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    states = ring.meta[:, S.state]
    assert (states == WRITING).sum() == 1
    dead_slot = int(np.flatnonzero(states == WRITING)[0])
    ring.meta[dead_slot, S.real_id] = 9  # even if its metadata looked right, it must not be served
    assert not take(ring, [9], [0])[0].found[0]
    assert dead_slot in ring.reserve(ring.slots, 0, 100)


def test_full_ring_never_evicts_pairs_ahead_of_the_trainers(ring: PairRing) -> None:
    ring.header.trainer_pos = 10
    for i in range(ring.slots):
        put(ring, real_id=i, position=10 + i)
    assert ring.reserve(1, 0, 100) == []
    ring.header.trainer_pos = 12  # the trainers passed positions 10 and 11
    assert sorted(ring.reserve(4, 0, 100)) == sorted(
        int(s) for s in np.flatnonzero(ring.meta[:, S.position] < 12))


def test_eviction_prefers_pairs_whose_image_has_a_newer_pair(ring: PairRing) -> None:
    ring.header.trainer_pos = 100
    slots = [put(ring, real_id=real_id, position=real_id) for real_id in range(ring.slots - 1)]  # all passed
    put(ring, real_id=3, position=50)  # image 3 now has a newer pair
    assert ring.reserve(1, 0, 100) == [slots[3]]
    assert ring.reserve(1, 0, 100) == [slots[0]]  # then the oldest


def producer_port(ring: PairRing, capacity: int, lead: int = 0) -> ProducerPort:
    """A producer's port whose lead is ``lead`` positions: trainers at ``lead`` positions/s, batches of 1 s."""
    port = ProducerPort(ring, capacity, lead_factor=1.0)
    TrainerPort(ring, leader=True).publish_speed(lead, 1.0)
    port.observe_batch(1.0)
    return port


def test_claims_are_bounded_by_unserved_pairs_waiting_and_serve_a_waiting_trainer_first(ring: PairRing) -> None:
    port = producer_port(ring, capacity=6)
    assert port.claim(4).positions.tolist() == [0, 1, 2, 3]
    for position in range(4):  # published for positions the trainers have not reached: 4 of 6 slots taken
        put(ring, real_id=position, position=position)
    assert port.claim(4).positions.tolist() == [4, 5]
    for position in (4, 5):
        put(ring, real_id=position, position=position)
    assert port.claim(4).positions.tolist() == []  # 6 unserved pairs wait
    take(ring, [0], [0])  # one served: it no longer counts as waiting
    assert port.claim(4).positions.tolist() == [6]
    TrainerPort(ring, leader=False).request(1, 4)
    assert port.claim(2).positions.tolist() == [1, 2]
    assert port.claim(2).positions.tolist() == [3]
    assert port.claim(2).positions.tolist() == [7]  # then on from where claims had reached, within the room left


def test_claims_start_where_the_trainers_will_be_however_far_that_is(ring: PairRing) -> None:
    trainers = TrainerPort(ring, leader=True)
    trainers.publish_position(100)
    assert producer_port(ring, capacity=1000, lead=50).claim(4).positions.tolist() == [150, 151, 152, 153]
    # Once ahead of the lead, claims simply continue.
    assert producer_port(ring, capacity=1000, lead=10).claim(2).positions.tolist() == [154, 155]
    # A lead far beyond the ring's 8 slots (into later epochs) is not capped by it.
    trainers.publish_position(1000)
    assert producer_port(ring, capacity=6, lead=50_000).claim(2).positions.tolist() == [51_000, 51_001]


def test_the_lead_is_the_first_trainer_batch_looked_up_after_a_batch_is_ready() -> None:
    ring = PairRing.local(slots=8, resolution=R)
    ring.clock_ns = iter([0, 0, 10**9]).__next__  # the ring's clock (ns) at each reading
    trainers = TrainerPort(ring, leader=True)
    trainers.publish_speed(100, 1.0)  # 100 positions/s, 50 at a time: a lookup every 0.5 s
    trainers.publish_position(0)  # at t = 0
    port = ProducerPort(ring, 6, lead_factor=1.0, trainer_batch=50)
    port.observe_batch(1.2)
    # Ready at 1.2 s: the lookups at 0.5 s and 1 s ([0, 50) and [50, 100)) come first.
    assert port.lead() == 100
    # Asked at t = 1 s, with no lookup published since: ready at 2.2 s, after those at 1.5 s and 2 s too.
    assert port.lead() == 200
    assert ProducerPort(ring, 6, lead_factor=0.0, trainer_batch=50).lead() == 0  # at the trainers


def test_only_the_leading_trainer_publishes(ring: PairRing) -> None:
    TrainerPort(ring, leader=False).publish_position(40)
    TrainerPort(ring, leader=False).publish_speed(100, 1.0)
    assert (ring.header.trainer_pos, ring.header.trainer_rate_milli) == (0, 0)
    TrainerPort(ring, leader=True).publish_position(40)
    assert ring.header.trainer_pos == 40


def test_lead_is_trainer_speed_times_smoothed_batch_time(ring: PairRing) -> None:
    port = ProducerPort(ring, capacity=10_000, lead_factor=1.5)
    trainers = TrainerPort(ring, leader=True)
    trainers.publish_speed(100, 1.0)
    assert port.lead() == 0  # no batch measured yet: claim at the trainers
    port.observe_batch(2.0)
    assert port.lead() == 300  # 100 positions/s x 2 s x 1.5
    port.observe_batch(4.0)  # smoothed: 0.8 x 2 + 0.2 x 4 = 2.4 s
    assert port.lead() == 360
    assert ProducerPort(ring, capacity=10_000, lead_factor=0.0).lead() == 0  # disabled


def test_urgently_claimed_positions_are_not_claimed_again(ring: PairRing) -> None:
    port = producer_port(ring, capacity=100)
    assert port.claim(2).positions.tolist() == [0, 1]
    TrainerPort(ring, leader=True).request(2, 6)  # the claim pointer is inside the urgent positions
    assert port.claim(2).positions.tolist() == [2, 3]
    assert port.claim(2).positions.tolist() == [4, 5]
    assert port.claim(2).positions.tolist() == [6, 7]  # not 2 and 3 again


def test_evictions_of_pairs_that_never_served_are_counted() -> None:
    ring = PairRing.local(slots=8, resolution=R)  # the same rules, in this process's memory
    ring.clock_ns = iter(range(100)).__next__  # birth times from a clock of our own
    ring.header.trainer_pos = 100
    for i in range(ring.slots):
        put(ring, real_id=i, position=i)
    assert ring.meta[:, S.birth_ns].tolist() == list(range(8))
    take(ring, [0, 1, 2], [50, 50, 50], max_reuse=2)
    served = ring.reserve(3, 0, 100)  # served pairs go first
    assert sorted(served) == [0, 1, 2] and ring.header.evicted_unserved == 0
    ring.reserve(2, 0, 100)
    port = TrainerPort(ring, leader=True)
    assert port.evicted_unserved == 2
    ProducerPort(ring, capacity=8, lead_factor=1.0).count_busy(1.5)
    assert port.busy_s == 1.5


def test_urgent_positions_the_trainers_have_passed_are_skipped(ring: PairRing) -> None:
    trainers = TrainerPort(ring, leader=True)
    trainers.request(10, 20)
    trainers.publish_position(18)
    assert producer_port(ring, capacity=100).claim(8).positions.tolist() == [18, 19]


def test_producers_report_readiness_and_one_fingerprint(ring: PairRing) -> None:
    trainers = TrainerPort(ring, leader=False)
    assert trainers.fingerprint is None
    ProducerPort(ring, 8, 1.0).report_ready("f00dfeedcafe0123")
    ProducerPort(ring, 8, 1.0).report_ready("f00dfeedcafe0123")
    assert trainers.ready_producers == 2 and trainers.fingerprint == "f00dfeedcafe0123"
    with pytest.raises(RingError, match="differs from f00dfeedcafe0123"):
        ProducerPort(ring, 8, 1.0).report_ready("0000000000000001")
    assert trainers.ready_producers == 2


def test_misspelt_header_fields_fail() -> None:
    header = RingHeader(np.zeros(len(RingHeader.FIELDS), dtype=np.int64))
    header.trainer_pos = 3
    assert header.cells[RingHeader.FIELDS.index("trainer_pos")] == 3
    with pytest.raises(AttributeError):
        header.trainer_position = 3
    with pytest.raises(AttributeError):
        header.trainer_position  # noqa: B018


def test_stale_segments_of_dead_creators_are_removed(no_leaked_segments) -> None:
    child = mp.get_context("spawn").Process(target=os.getpid)
    child.start()
    child.join(60)
    dead = shared_memory.SharedMemory(name=f"onlinemix-{child.pid}-deadbeef", create=True, size=64)
    live = PairRing.create(slots=1, resolution=R)
    try:
        removed = remove_stale_segments()
        assert dead.name in removed and live.name not in removed
        assert PairRing.attach(live.name).header.slots == 1
    finally:
        dead.close()
        try:
            dead.unlink()
        except FileNotFoundError:
            pass
        live.close()


def test_too_small_shared_memory_is_a_clear_error_at_start(monkeypatch, no_leaked_segments) -> None:
    class Usage:
        total = used = 0
        free = 64 * 2**20

    monkeypatch.setattr(ring_module.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(RingError, match="shm-size"):
        PairRing.create(slots=100_000, resolution=64)


def test_a_file_size_limit_below_the_ring_is_a_clear_error_at_start(no_leaked_segments) -> None:
    """The segment is a file in /dev/shm: past ``ulimit -f`` it failed with an OSError traceback, and
    the standard library's clean-up added a resource-tracker KeyError traceback."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        with pytest.raises(RingError, match=r"may write files of at most 1.0 MiB \(ulimit -f\); lower ring.slots"):
            PairRing.create(slots=1000, resolution=64)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_attach_to_missing_ring_is_a_clear_error() -> None:
    with pytest.raises(RingError, match="does not exist"):
        PairRing.attach("onlinemix-1-nothere")


def test_checksum_is_crc32_of_both_images(ring: PairRing) -> None:
    real, synthetic = random_pair(1)
    slot = ring.reserve(1, 0, 100)[0]
    assert ring.write(slot, real, synthetic) == zlib.crc32(np.stack([real, synthetic]).tobytes())
    ring.release([slot])
    assert ring.meta[slot, S.state] != READY
