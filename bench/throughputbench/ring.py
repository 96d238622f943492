"""Pairs/s through ``PairRing`` in one process, a producer's writes then a trainer's takes, against a numpy
copy of the same bytes with the same batching."""

from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from onlinemix.core.config import Config
from onlinemix.exchange.ring import PairRing, ProducerPort


def bench_ring(cfg: Config, real: np.ndarray, synthetic: np.ndarray, write_batch: int, take_batch: int, repeats: int,
               bar: tqdm) -> dict:
    """Pairs/s through ``PairRing`` in one process vs a numpy copy of the same bytes, same batching.

    A ring round: write ``write_batch`` pairs at a time through ``ProducerPort.write_pairs`` (reserve,
    copy + CRC32, one ``publish_many`` per batch: what a producer does), then ``take`` them ``take_batch`` ids at a time with max_reuse=1 so every slot
    is freed again (what a trainer does; CRC32 verified when ring.verify_checksums). The numpy
    round copies the same pairs into a (N, 2, 3, R, R) array in the same chunks and back out.
    Producer and trainer sides run in different processes in a real run; here their costs add up.
    """
    n, r = real.shape[0], real.shape[-1]
    max_age = cfg.staleness.max_age
    verify = cfg.ring.verify_checksums
    ids = np.arange(n, dtype=np.int64)
    out = np.empty((take_batch, 2, 3, r, r), dtype=np.uint8)
    epochs = np.zeros(n, dtype=np.int64)
    ring = PairRing.create(n, r)
    producer = ProducerPort(ring, capacity=n, lead_factor=0.0)
    try:
        def ring_round() -> tuple[float, float]:
            if ring.occupancy()["free"] < n:  # write_pairs would wait for slots forever
                raise RuntimeError("ring full: a previous round left slots behind")
            t0 = time.perf_counter()
            for s in range(0, n, write_batch):
                e = min(n, s + write_batch)
                written = producer.write_pairs(real[s:e], synthetic[s:e], ids[s:e], ids[s:e], ids[s:e].tolist(),
                                               epochs[s:e], max_age)
                if written != e - s:
                    raise RuntimeError("the ring closed while a batch was written")
            t1 = time.perf_counter()
            for s in range(0, n, take_batch):
                e = min(n, s + take_batch)
                result = ring.take(ids[s:e], ids[s:e], 0, out[: e - s], max_reuse=1, max_age=max_age, verify=verify)
                if not result.found.all():
                    raise RuntimeError(f"ring lost {int((~result.found).sum())} pairs")
            return t1 - t0, time.perf_counter() - t1

        dest = np.empty((n, 2, 3, r, r), dtype=np.uint8)

        def numpy_round() -> tuple[float, float]:
            t0 = time.perf_counter()
            for s in range(0, n, write_batch):
                e = min(n, s + write_batch)
                dest[s:e, 0] = real[s:e]
                dest[s:e, 1] = synthetic[s:e]
            t1 = time.perf_counter()
            for s in range(0, n, take_batch):
                e = min(n, s + take_batch)
                out[: e - s] = dest[s:e]
            return t1 - t0, time.perf_counter() - t1

        bar.set_description(f"ring {n} pairs (warm-up)")
        ring_round(), numpy_round()
        bar.update(2)
        bar.set_description(f"ring {n} pairs")
        ring_w, ring_t, np_w, np_t = [], [], [], []
        for _ in range(repeats):
            w, t = ring_round()
            ring_w.append(w)
            ring_t.append(t)
            w, t = numpy_round()
            np_w.append(w)
            np_t.append(t)
            bar.update(2)
        if ring.header.checksum_errors:
            raise RuntimeError(f"ring reported {ring.header.checksum_errors} checksum errors")
    finally:
        ring.close()
    ring_s, np_s = sum(ring_w) + sum(ring_t), sum(np_w) + sum(np_t)
    pairs = n * repeats
    return {"pairs": n, "slots": n, "resolution": r, "repeats": repeats, "write_batch": write_batch,
            "take_batch": take_batch, "verify_checksums": verify, "pair_bytes": 2 * 3 * r * r,
            "ring_pairs_s": pairs / ring_s, "ring_write_pairs_s": pairs / sum(ring_w),
            "ring_take_pairs_s": pairs / sum(ring_t),
            "numpy_pairs_s": pairs / np_s, "numpy_write_pairs_s": pairs / sum(np_w),
            "numpy_take_pairs_s": pairs / sum(np_t),
            "numpy_over_ring": (pairs / np_s) / (pairs / ring_s)}
