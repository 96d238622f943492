"""The pairs the ring benchmark moves, and the checks that each arrived intact, exactly once.

Producer p writes ids p*K .. p*K+K-1 and cycles through a small pool of random pairs, stamping each pair's
last 8 bytes with its id just before sending it. So the contents of pair ``id`` are known in every process
without sending them: the checksum of its pool entry without its last word, plus the stamp.
"""

from __future__ import annotations

import time
import zlib

import numpy as np

MASK64 = (1 << 64) - 1


def pair_bytes(r: int) -> int:
    """Bytes of one (real, synthetic) pair of R x R RGB images."""
    return 2 * 3 * r * r


def make_pool(seed: int, r: int, producer: int, n: int) -> np.ndarray:
    """The ``n`` random source pairs producer ``producer`` cycles through; pair k is pool[k % n]."""
    rng = np.random.default_rng([seed, r, producer])
    return np.frombuffer(rng.bytes(n * pair_bytes(r)), dtype=np.uint8).reshape(n, 2, 3, r, r).copy()


def stamps(pool: np.ndarray) -> np.ndarray:
    """The last 8 bytes of every pool entry as one int64 each, to write a pair's id into before it is sent."""
    return pool.reshape(len(pool), -1)[:, -8:].view(np.int64)


def expected_sums(pool: np.ndarray) -> tuple[list[int], list[int]]:
    """Per pool entry: (sum of its 64-bit words but the last, mod 2**64; CRC32 of all but its last 8 bytes)."""
    flat = pool.reshape(len(pool), -1)
    sums = [int(row.view(np.uint64)[:-1].sum(dtype=np.uint64)) for row in flat]
    crcs = [zlib.crc32(row[:-8]) for row in flat]
    return sums, crcs


class PairChecker:
    """Checks a received pair against what its producer wrote: id stamp plus sum64 or CRC32."""

    def __init__(self, expected: list[tuple[list[int], list[int]]], k: int, pool_size: int, mode: str) -> None:
        self.sums = [e[0] for e in expected]
        self.crcs = [e[1] for e in expected]
        self.k, self.pool_size, self.mode = k, pool_size, mode
        self.seconds = 0.0

    def __call__(self, pair: np.ndarray, real_id: int) -> bool:
        t0 = time.perf_counter()
        flat = pair.reshape(-1)
        words = flat.view(np.uint64)
        producer, j = divmod(real_id, self.k)
        if not 0 <= producer < len(self.sums):
            return False  # an id nobody wrote
        j %= self.pool_size
        ok = int(words[-1]) == real_id
        if self.mode == "crc32":
            ok = ok and zlib.crc32(flat[:-8]) == self.crcs[producer][j]
        else:
            ok = ok and int(words.sum(dtype=np.uint64)) == (self.sums[producer][j] + real_id) & MASK64
        self.seconds += time.perf_counter() - t0
        return ok


def consumer_ids(c: int, n_producers: int, n_consumers: int, k: int) -> np.ndarray:
    """Consumer c's ids in the order it asks for them: position-major over the producers' streams."""
    order = (np.arange(k, dtype=np.int64)[:, None] + k * np.arange(n_producers, dtype=np.int64)[None, :]).ravel()
    return order[order % n_consumers == c]


def intactness(consumers: list[dict], total: int) -> dict:
    """Whether the consumers received each of the ``total`` ids exactly once, with the right contents."""
    ids = np.concatenate([np.asarray(res["received"], dtype=np.int64) for res in consumers] or [np.empty(0, np.int64)])
    in_range = (ids >= 0) & (ids < total)
    out_of_range = int((~in_range).sum())
    counts = np.bincount(ids[in_range], minlength=total)
    bad = sum(res["bad"] for res in consumers)
    return {"received": int(len(ids)), "missing": int((counts == 0).sum()), "duplicates": int((counts > 1).sum()),
            "out_of_range": out_of_range, "bad_checksums": int(bad),
            "all_pairs_intact": bool((counts == 1).all() and bad == 0 and out_of_range == 0 and len(ids) == total)}
