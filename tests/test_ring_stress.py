"""Several producer and consumer processes on a small ring: nothing lost, torn or over-used."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

from onlinemix.exchange.ring import PairRing

R = 16
PAIRS = 1200
MAX_REUSE = 2
FAR_AHEAD = 10**9  # every request may use any pair; none is ever "passed" and evicted


def pair_content(real_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Both images derive from the id, so a reader can tell a whole pair from a torn or swapped one."""
    rng = np.random.default_rng(real_id)
    return rng.integers(0, 256, (3, R, R), dtype=np.uint8), rng.integers(0, 256, (3, R, R), dtype=np.uint8)


def producer(name: str, ids: list[int]) -> None:
    ring = PairRing.attach(name)
    try:
        i = 0
        while i < len(ids):
            slots = ring.reserve(min(4, len(ids) - i), 0, 10)
            for slot in slots:
                real, synthetic = pair_content(ids[i])
                checksum = ring.write(slot, real, synthetic)
                ring.publish(slot, real_id=ids[i], position=ids[i], seed=0, birth_epoch=0, checksum=checksum)
                i += 1
            if not slots:
                time.sleep(0.001)
    finally:
        ring.close()


def consumer(name: str, served: mp.Queue, torn: mp.Queue) -> None:
    """Asks for every id over and over until all pairs have been published and retired."""
    ring = PairRing.attach(name)
    counts = np.zeros(PAIRS, dtype=np.int64)
    out = np.zeros((PAIRS, 2, 3, R, R), dtype=np.uint8)
    ids = np.arange(PAIRS)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = ring.header.generated == PAIRS and ring.occupancy()["free"] == ring.slots
            result = ring.take(ids, np.full(PAIRS, FAR_AHEAD), 0, out, max_reuse=MAX_REUSE, max_age=10, verify=False)
            for i in np.flatnonzero(result.found):
                real, synthetic = pair_content(int(i))
                if not (np.array_equal(out[i, 0], real) and np.array_equal(out[i, 1], synthetic)):
                    torn.put(int(i))
            counts += result.found
            if done:
                break
    finally:
        served.put(counts)
        ring.close()


def test_many_producers_and_consumers(no_leaked_segments) -> None:
    ctx = mp.get_context("spawn")
    ring = PairRing.create(slots=12, resolution=R)
    served, torn = ctx.Queue(), ctx.Queue()
    try:
        procs = [ctx.Process(target=producer, args=(ring.name, list(range(k, PAIRS, 3)))) for k in range(3)]
        procs += [ctx.Process(target=consumer, args=(ring.name, served, torn)) for _ in range(2)]
        for p in procs:
            p.start()
        counts = served.get(timeout=180) + served.get(timeout=180)
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 5
        assert torn.empty(), "a consumer saw a torn or swapped pair"
        # Without verification, a torn pair would have reached a consumer: the content check is the witness.
        assert ring.header.generated == PAIRS
        assert counts.tolist() == [MAX_REUSE] * PAIRS  # none lost, none used more than max_reuse
    finally:
        ring.close()
