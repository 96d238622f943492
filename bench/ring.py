"""Pairs through the shared-memory ring vs the plain alternatives, measured side by side in one run.

    python bench/ring.py                  # 224 and 512 px, P = 1..4 producers, C = 1..2 consumers
    python bench/ring.py --quick          # seconds; what tests/test_bench_ring.py runs
    python bench/ring.py --resolutions 512 --producers 2 --consumers 1 --checksums off

For each resolution R and each (P producers, C consumers):

* ring: P producer processes each write K pairs of (2, 3, R, R) uint8 into one ``PairRing``
  (``reserve`` / ``write`` / ``publish_many`` in chunks of ``--write-batch``, waiting while the ring is
  full) and C consumer processes ``borrow`` them by id (disjoint subsets of the ids, ``--take-batch``
  ids per call, ``max_reuse=1`` so every slot is freed again, retrying ids not written yet), read
  each pair where it lies in shared memory, as the trainer's augmentation does, and give the loan
  back; once with ``verify=True`` (CRC32 checked on every borrow) and once with ``verify=False``.
  ``--consumer-read copy`` makes them ``take`` pairs into a batch buffer instead.
  Rate = pairs / (wall time from the start barrier to the last pair consumed).
* Queue: the same P producers ``put((id, tensor (2, 3, R, R) uint8))`` into one
  ``torch.multiprocessing`` Queue (spawn context, as many items in flight as the ring has slots)
  and the same C consumers ``get`` them and read each tensor where it lies (or copy it into a batch
  buffer with ``--consumer-read copy``); same clock.
* memcpy: one process copies the same bytes with ``np.copyto`` in the same chunking, as often as
  the ring copies them: once (producer side, into a ring-sized array), and with
  ``--consumer-read copy`` once more (consumer side, out of it into a batch buffer).

Every consumer checks every pair it receives against the pair its producer wrote (an id stamp
and a checksum of the whole pair), and the script checks that each pair arrived exactly once;
``all_pairs_intact`` in the JSON records the outcome per row. See bench/README.md.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the imports: the reported wall time includes them

import argparse
import multiprocessing as mp
import os
import platform
import queue as queue_module
import shutil
import signal
import sys
import traceback
import zlib
from pathlib import Path

import numpy as np
from common import (
    SKEW_CORES,
    BenchParser,
    cpu_name,
    cpu_snapshot,
    import_pyplot,
    int_list,
    load_line,
    other_cores_since,
    results_path,
    run_meta,
    save_figure,
    save_results,
    target,
    target_line,
)
from tqdm.auto import tqdm

from onlinemix.exchange.ring import NAME_PREFIX, SHM_DIR, PairRing

TARGET_MEMCPY = 0.5   # ring GB/s >= this x memcpy GB/s
TARGET_QUEUE = 5.0    # ring pairs/s >= this x Queue pairs/s at the same P, C
MAX_AGE = 1 << 40     # no pair ever expires here
MASK64 = (1 << 64) - 1

# Values used when a flag is not given: (default run, --quick run).
DEFAULTS = {
    "resolutions": ("224,512", "64"),
    "producers": ("1,2,3,4", "1,2"),
    "consumers": ("1,2", "1"),
    "mib_per_config": (1024.0, 12.0),
    "slots": (128, 64),
    "memcpy_repeats": (3, 2),
}

CONTENTION_NOTE = ("{cores} CPU core(s) here, and a configuration runs up to {procs} busy processes "
                   "(P producers + C consumers): rates with P + C > {cores} are bound by CPU contention, "
                   "not by the ring, and would be higher with a core per process.")


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/ring.py",
        description="Move (real, synthetic) uint8 image pairs from P producer processes to C consumer\n"
                    "processes through the shared-memory PairRing, through a torch.multiprocessing Queue,\n"
                    "and measure a plain numpy copy of the same bytes; report pairs/s, GB/s and the\n"
                    "ring's ratios to both alternatives.",
        epilog="Flags left out take the default run's value, or the --quick value when --quick is\n"
               "given (shown as 'default / quick'). Results: one table per resolution on stdout, JSON at\n"
               "--out and a PNG plot next to it. Progress bars go to stderr.",
        defaults=DEFAULTS,
        quick_help="resolution 64 only, P in {1,2}, C = 1, a few MiB per producer: well under 30 s on 2 CPU "
                   "cores (smoke test); the numbers are then noisy")
    q = p.default_note
    p.add_argument("--resolutions", default=None,
                   help=f"comma-separated image sides R in pixels; a pair is 2*3*R*R bytes; R must be even "
                        f"{q('resolutions')}")
    p.add_argument("--producers", default=None,
                   help=f"comma-separated producer process counts P to measure {q('producers')}")
    p.add_argument("--consumers", default=None,
                   help=f"comma-separated consumer process counts C to measure {q('consumers')}")
    p.add_argument("--pairs", type=int, default=None,
                   help="pairs K each producer writes, in every configuration (default: set by --mib-per-config)")
    p.add_argument("--mib-per-config", type=float, default=None,
                   help=f"sets K when --pairs is not given: every configuration moves this many MiB in all, so "
                        f"K = MiB / P / pair size (at least --write-batch), and the memcpy baseline copies the "
                        f"same amount {q('mib_per_config')}")
    p.add_argument("--slots", type=int, default=None,
                   help=f"ring slots; the Queue gets the same number of items in flight (maxsize) "
                        f"{q('slots')}")
    p.add_argument("--write-batch", type=int, default=16,
                   help="slots a producer reserves per reserve() call, then writes and publishes one by one "
                        "(default 16, the package's generator.batch_size); also the memcpy write chunk")
    p.add_argument("--take-batch", type=int, default=32,
                   help="ids a consumer asks for per take() call (default 32); also the memcpy read chunk")
    p.add_argument("--consumer-read", choices=("in-place", "copy"), default="in-place",
                   help="how a consumer reads its pairs (default in-place). in-place: ring consumers borrow() "
                        "pairs and check them where they lie in shared memory, as the trainer's augmentation "
                        "reads them; Queue consumers check the received shared tensor itself; the memcpy "
                        "baseline makes one copy. copy: ring consumers take() pairs into a (take_batch, ...) "
                        "buffer, Queue consumers copy each tensor into one; the memcpy baseline copies twice")
    p.add_argument("--checksums", choices=("both", "on", "off"), default="both",
                   help="ring runs with verify=True (CRC32 of every pair checked when it is borrowed), with "
                        "verify=False, or both (default both). The producer side always computes the CRC32: "
                        "PairRing.write returns it")
    p.add_argument("--intact-check", choices=("sum64", "crc32"), default="sum64",
                   help="how consumers check each received pair against what its producer wrote, in the ring "
                        "and the Queue runs alike: sum64 = id stamp + sum of the pair's 64-bit words (~20 GB/s, "
                        "the default, so the check barely shows in the rates) or crc32 = id stamp + CRC32 of the "
                        "pair (~2.5-5 GB/s, a second CRC pass on the consumer side)")
    p.add_argument("--sharing-strategy", choices=("default", "file_descriptor", "file_system"), default="default",
                   help="torch.multiprocessing.set_sharing_strategy for the Queue runs (default: leave torch's "
                        "default, file_descriptor on Linux)")
    p.add_argument("--no-queue", action="store_true", help="skip the torch.multiprocessing Queue baseline")
    p.add_argument("--memcpy-repeats", type=int, default=None,
                   help=f"memcpy rounds per resolution; the median is reported {q('memcpy_repeats')}")
    p.add_argument("--poll-ms", type=float, default=0.2,
                   help="sleep of a producer that has to wait (ring full or too far ahead of the consumers) and "
                        "of a consumer whose take() found none of its ids (default 0.2)")
    p.add_argument("--retries", type=int, default=1,
                   help="repeat a measurement during which other processes used more than 0.2 cores on average "
                        "(it is skewed) up to this many times and keep the least skewed attempt (default 1; 0 "
                        "measures everything once, as fast as possible)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one configuration may take before the run is aborted (default 300)")
    p.add_argument("--profile", action="store_true",
                   help="also count, in every ring worker, the time spent in flock (the ring's lock, waiting "
                        "included) and in zlib.crc32 inside PairRing's calls, and print a cost breakdown per ring "
                        "row (microseconds per pair). Adds a little overhead per lock and CRC call")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pair contents (default 0)")
    args = p.parse(argv)
    args.resolutions = sorted(set(int_list(p, "--resolutions", args.resolutions)))
    args.producers = sorted(set(int_list(p, "--producers", args.producers)))
    args.consumers = sorted(set(int_list(p, "--consumers", args.consumers)))
    if any(r % 2 or r < 4 for r in args.resolutions):
        p.error("--resolutions must be even and >= 4 (pairs are checked as 64-bit words)")
    p.require_at_least(args, 1, "slots", "write_batch", "take_batch", "memcpy_repeats", "pairs")
    if args.mib_per_config <= 0 or args.poll_ms < 0 or args.timeout <= 0:
        p.error("--mib-per-config and --timeout must be > 0, --poll-ms >= 0")
    p.require_at_least(args, 0, "retries")
    if args.slots < max(args.producers):
        p.error("--slots must be at least the largest --producers value (each producer needs room ahead)")
    args.verify = {"both": [True, False], "on": [True], "off": [False]}[args.checksums]
    return args


def pairs_per_producer(args: argparse.Namespace, r: int, n_producers: int) -> int:
    if args.pairs is not None:
        return args.pairs
    return max(args.write_batch, round(args.mib_per_config * 2**20 / n_producers / pair_bytes(r)))


def pair_bytes(r: int) -> int:
    return 2 * 3 * r * r


# ----------------------------------------------------------------------------- pair contents

def make_pool(seed: int, r: int, producer: int, n: int) -> np.ndarray:
    """The ``n`` random source pairs producer ``producer`` cycles through; pair k is pool[k % n].

    Each pair's last 8 bytes are overwritten with its id just before it is sent, so the contents
    of pair ``id`` are known everywhere without sending them: the checksum of the pool entry
    without its last word (``expected_sums``) plus the stamp.
    """
    rng = np.random.default_rng([seed, r, producer])
    return np.frombuffer(rng.bytes(n * pair_bytes(r)), dtype=np.uint8).reshape(n, 2, 3, r, r).copy()


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


def _touch(a: np.ndarray) -> None:
    """Map every page of ``a`` into this process before the clock starts (a long-lived process has)."""
    flat = a.reshape(-1)
    int(flat[::4096].sum())


def _worker_start() -> None:
    # Ctrl-C goes to the whole process group; the parent handles it and ends its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Counted:
    """A module whose function ``fn`` also adds its wall time to ``seconds[key]``."""

    def __init__(self, module, fn: str, seconds: dict, key: str) -> None:
        self._module, self._fn, self._seconds, self._key = module, getattr(module, fn), seconds, key
        setattr(self, fn, self._call)

    def _call(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self._fn(*a, **kw)
        finally:
            self._seconds[self._key] += time.perf_counter() - t0

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def profile_ring_module(seconds: dict) -> None:
    """--profile: count the time this worker spends in flock (waiting for and taking the ring's lock) and in
    crc32 inside PairRing's own calls, by swapping the ring module's ``fcntl`` and ``crc32`` for counting
    wrappers in this worker process only (the package itself is not changed)."""
    from onlinemix.exchange import ring as ring_module

    seconds.setdefault("flock", 0.0)
    seconds.setdefault("crc32", 0.0)
    ring_module.fcntl = _Counted(ring_module.fcntl, "flock", seconds, "flock")
    crc32 = ring_module.crc32

    def counted_crc32(data) -> int:
        t0 = time.perf_counter()
        try:
            return crc32(data)
        finally:
            seconds["crc32"] += time.perf_counter() - t0

    ring_module.crc32 = counted_crc32


# ----------------------------------------------------------------------------- ring workers

def ring_producer(name: str, p: int, k: int, r: int, write_batch: int, lead: int, seed: int, progress,
                  barrier, results, poll_s: float, timeout: float, profile: bool) -> None:
    """Write pairs p*k .. p*k+k-1 (positions 0..k-1) in reserve/write/publish chunks of ``write_batch``.

    Flow control: never more than ``lead`` positions ahead of the slowest consumer (the package's
    producers bound their claims by the unserved pairs waiting instead), so the P producers never
    hold more than P * lead <= slots pairs nobody is asking for yet. While reserve() finds no free
    slot (the ring is full), wait and retry.
    """
    _worker_start()
    try:
        ring = PairRing.attach(name)
    except Exception:
        results.put({"role": "producer", "index": p, "error": traceback.format_exc()})
        return
    try:
        pool = make_pool(seed, r, p, write_batch)
        stamps = pool.reshape(write_batch, -1)[:, -8:].view(np.int64)
        prog = np.frombuffer(progress, dtype=np.int64)
        _touch(ring.pixels)
        seconds = {"reserve": 0.0, "write": 0.0, "publish": 0.0, "wait": 0.0}
        if profile:
            profile_ring_module(seconds)
        clock = time.perf_counter
        barrier.wait(timeout)
        t_start = clock()
        deadline = t_start + timeout
        base, pos = p * k, 0
        stats = {"reserve_calls": 0, "reserve_short": 0, "waits_ring_full": 0, "waits_ahead": 0}
        while pos < k:
            n = min(write_batch, k - pos, int(prog.min()) + lead - pos)
            if n <= 0:
                stats["waits_ahead"] += 1
                t0 = clock()
                _sleep(poll_s, deadline, "producer waits for consumers")
                seconds["wait"] += clock() - t0
                continue
            t0 = clock()
            slots = ring.reserve(n, 0, MAX_AGE)
            seconds["reserve"] += clock() - t0
            stats["reserve_calls"] += 1
            if len(slots) < n:
                stats["reserve_short"] += 1
            if not slots:
                stats["waits_ring_full"] += 1
                t0 = clock()
                _sleep(poll_s, deadline, "producer waits for a free slot")
                seconds["wait"] += clock() - t0
                continue
            checksums = []
            t0 = clock()
            for i in range(len(slots)):
                j = (pos + i) % write_batch
                stamps[j] = base + pos + i
                checksums.append(ring.write(slots[i], pool[j, 0], pool[j, 1]))
            t1 = clock()
            written = np.arange(pos, pos + len(slots))
            ring.publish_many(slots, real_ids=base + written, positions=written, seeds=written, birth_epochs=0,
                              checksums=checksums)
            seconds["write"] += t1 - t0
            seconds["publish"] += clock() - t1
            pos += len(slots)
        results.put({"role": "producer", "index": p, "t_start": t_start, "t_end": clock(), "seconds": seconds,
                     **stats})
    except Exception:
        results.put({"role": "producer", "index": p, "error": traceback.format_exc()})
    finally:
        ring.close()


def ring_consumer(name: str, c: int, n_producers: int, n_consumers: int, k: int, r: int, take_batch: int,
                  verify: bool, expected, write_batch: int, check_mode: str, progress, barrier, results,
                  poll_s: float, timeout: float, profile: bool, read: str) -> None:
    """Borrow (or take) this consumer's ids, ``take_batch`` at a time, in order; ids not found stay in the
    next request."""
    _worker_start()
    try:
        ring = PairRing.attach(name)
    except Exception:
        results.put({"role": "consumer", "index": c, "error": traceback.format_exc()})
        return
    try:
        mine = consumer_ids(c, n_producers, n_consumers, k)
        check = PairChecker(expected, k, write_batch, check_mode)
        out = np.zeros((take_batch, 2, 3, r, r), dtype=np.uint8)
        prog = np.frombuffer(progress, dtype=np.int64)
        received: list[np.ndarray] = []
        bad = takes = empty_takes = 0
        window, nxt = mine[:take_batch], min(take_batch, len(mine))
        _touch(ring.pixels)
        seconds = {"take": 0.0, "wait": 0.0}
        if profile:
            profile_ring_module(seconds)
        clock = time.perf_counter
        barrier.wait(timeout)
        t_start = t_last = clock()
        deadline = t_start + timeout
        while len(window):
            t0 = clock()
            if read == "copy":
                found = ring.take(window, window % k, 0, out[: len(window)], max_reuse=1, max_age=MAX_AGE,
                                  verify=verify).found
                pairs = out
            else:
                loan = ring.borrow(window, window % k, 0, max_reuse=1, max_age=MAX_AGE, verify=verify)
                found, pairs = loan.result.found, loan
            seconds["take"] += clock() - t0
            takes += 1
            if not found.any():
                empty_takes += 1
                t0 = clock()
                _sleep(poll_s, deadline, "consumer waits for pairs")
                seconds["wait"] += clock() - t0
                continue
            for i in np.flatnonzero(found):
                bad += not check(out[i] if read == "copy" else pairs.pair(i), int(window[i]))
            if read != "copy":
                t0 = clock()
                ring.give_back(loan)
                seconds["take"] += clock() - t0
            received.append(window[found])
            t_last = clock()
            refill = mine[nxt: nxt + int(found.sum())]
            nxt += len(refill)
            window = np.concatenate([window[~found], refill])
            # Everything before the window has arrived: tell the producers how far this consumer is.
            prog[c] = int((window % k).min()) if len(window) else k
        results.put({"role": "consumer", "index": c, "t_start": t_start, "t_last": t_last,
                     "received": np.concatenate(received) if received else np.empty(0, np.int64), "bad": bad,
                     "takes": takes, "empty_takes": empty_takes, "check_s": check.seconds,
                     "seconds": {**seconds, "check": check.seconds}})
    except Exception:
        results.put({"role": "consumer", "index": c, "error": traceback.format_exc()})
    finally:
        ring.close()


def _sleep(seconds: float, deadline: float, what: str) -> None:
    if time.perf_counter() > deadline:
        raise TimeoutError(f"{what} past --timeout")
    time.sleep(seconds)


# ----------------------------------------------------------------------------- queue workers

def _torch_setup(strategy: str):
    import torch
    import torch.multiprocessing as tmp

    torch.set_num_threads(1)
    if strategy != "default":
        tmp.set_sharing_strategy(strategy)
    return torch


def queue_producer(q, p: int, k: int, r: int, write_batch: int, seed: int, strategy: str, barrier, results, done,
                   timeout: float) -> None:
    """Put (id, tensor (2, 3, R, R) uint8) items for ids p*k .. p*k+k-1, then one None.

    Each item is allocated straight in shared memory (torch's own UntypedStorage._new_shared, what
    Tensor.share_memory_() uses) and filled with one copy, so pickling it for the Queue copies
    nothing more: the same number of copies as ring.write, the Queue's most favourable setup.
    """
    _worker_start()
    try:
        torch = _torch_setup(strategy)
        pool = make_pool(seed, r, p, write_batch)
        stamps = pool.reshape(write_batch, -1)[:, -8:].view(np.int64)
        nbytes = pair_bytes(r)
        new_shared = getattr(torch.UntypedStorage, "_new_shared", None)

        def shared_tensor():
            if new_shared is None:
                return torch.empty((2, 3, r, r), dtype=torch.uint8).share_memory_()
            return torch.empty(0, dtype=torch.uint8).set_(new_shared(nbytes)).view(2, 3, r, r)

        barrier.wait(timeout)
        t_start = time.perf_counter()
        base = p * k
        for pos in range(k):
            j = pos % write_batch
            stamps[j] = base + pos
            t = shared_tensor()
            np.copyto(t.numpy(), pool[j])
            q.put((base + pos, t), timeout=timeout)
            del t
        q.put(None, timeout=timeout)
        results.put({"role": "producer", "index": p, "t_start": t_start, "t_end": time.perf_counter(),
                     "strategy": torch.multiprocessing.get_sharing_strategy(),
                     "allocation": "_new_shared" if new_shared else "share_memory_"})
        # With file descriptors, a consumer fetches each item's fd from this process: stay alive until all are in.
        done.wait(timeout)
    except Exception:
        results.put({"role": "producer", "index": p, "error": traceback.format_exc()})


def queue_consumer(q, c: int, n_producers: int, k: int, r: int, take_batch: int, expected, write_batch: int,
                   check_mode: str, strategy: str, sentinels, barrier, results, timeout: float, read: str) -> None:
    """Get items until every producer's None has been seen and check each one: in the received shared
    tensor itself (``read='in-place'``), or after copying it into a (take_batch, ...) buffer, the trainer's
    batch, as ring.take fills ``out`` (``read='copy'``)."""
    _worker_start()
    try:
        _torch_setup(strategy)
        check = PairChecker(expected, k, write_batch, check_mode)
        out = np.zeros((take_batch, 2, 3, r, r), dtype=np.uint8)
        received: list[int] = []
        bad = gets = empty_gets = 0
        row = 0
        barrier.wait(timeout)
        t_start = t_last = time.perf_counter()
        deadline = t_start + timeout
        while True:
            try:
                item = q.get(timeout=0.005)
            except queue_module.Empty:
                # Each producer's None follows all its items, so once all P are seen every item has been got.
                if sentinels.value >= n_producers:
                    break
                empty_gets += 1
                if time.perf_counter() > deadline:
                    raise TimeoutError("queue consumer past --timeout") from None
                continue
            gets += 1
            if item is None:
                with sentinels.get_lock():
                    sentinels.value += 1
                continue
            real_id, t = item
            if read == "copy":
                np.copyto(out[row], t.numpy())
                bad += not check(out[row], real_id)
            else:
                bad += not check(t.numpy(), real_id)
            del t, item
            received.append(real_id)
            row = (row + 1) % take_batch
            t_last = time.perf_counter()
        results.put({"role": "consumer", "index": c, "t_start": t_start, "t_last": t_last,
                     "received": np.asarray(received, dtype=np.int64), "bad": bad, "gets": gets,
                     "empty_gets": empty_gets, "check_s": check.seconds})
    except Exception:
        results.put({"role": "consumer", "index": c, "error": traceback.format_exc()})


# ----------------------------------------------------------------------------- running a configuration

def _collect(results, procs: list, n: int, timeout: float, what: str) -> list[dict]:
    """Wait for ``n`` result dicts from the workers; fail fast when one reports an error or dies."""
    got: list[dict] = []
    deadline = time.perf_counter() + timeout
    while len(got) < n:
        try:
            res = results.get(timeout=0.2)
        except queue_module.Empty:
            dead = [pr for pr in procs if pr.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{what}: worker {dead[0].name} exited with code {dead[0].exitcode}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{what}: no result after {timeout:.0f} s (--timeout)")
            continue
        if "error" in res:
            raise RuntimeError(f"{what}: {res['role']} {res['index']} failed:\n{res['error']}")
        got.append(res)
    return got


def _stop(procs: list, barrier=None, graceful: bool = True) -> None:
    """End this configuration's workers (all started by this process): they exit on their own after
    reporting; after an error or Ctrl-C they are terminated at once."""
    if barrier is not None and not graceful:
        try:
            barrier.abort()
        except Exception:
            pass
    for pr in procs:
        if graceful and pr.pid is not None:
            pr.join(timeout=10)
        if pr.is_alive():
            pr.terminate()
            pr.join(timeout=5)
        if pr.is_alive():
            pr.kill()
            pr.join()


def intactness(consumers: list[dict], total: int) -> dict:
    ids = np.concatenate([np.asarray(res["received"], dtype=np.int64) for res in consumers] or [np.empty(0, np.int64)])
    in_range = (ids >= 0) & (ids < total)
    out_of_range = int((~in_range).sum())
    counts = np.bincount(ids[in_range], minlength=total)
    bad = sum(res["bad"] for res in consumers)
    return {"received": int(len(ids)), "missing": int((counts == 0).sum()), "duplicates": int((counts > 1).sum()),
            "out_of_range": out_of_range, "bad_checksums": int(bad),
            "all_pairs_intact": bool((counts == 1).all() and bad == 0 and out_of_range == 0 and len(ids) == total)}


def run_ring(args: argparse.Namespace, r: int, n_producers: int, n_consumers: int, k: int, verify: bool,
             expected: list) -> dict:
    ctx = mp.get_context("spawn")
    what = f"ring R={r} P={n_producers} C={n_consumers} checksums {'on' if verify else 'off'}"
    ring = PairRing.create(args.slots, r)
    procs: list = []
    barrier, graceful = None, False
    try:
        ring.pixels[...] = 0  # allocate every page of the segment before the clock starts
        progress = ctx.RawArray("q", n_consumers)
        barrier = ctx.Barrier(n_producers + n_consumers)
        results = ctx.Queue()
        lead = args.slots // n_producers
        poll_s = args.poll_ms / 1e3
        for p in range(n_producers):
            procs.append(ctx.Process(target=ring_producer, name=f"ring-producer-{p}", daemon=True, args=(
                ring.name, p, k, r, args.write_batch, lead, args.seed, progress, barrier, results, poll_s,
                args.timeout, args.profile)))
        for c in range(n_consumers):
            procs.append(ctx.Process(target=ring_consumer, name=f"ring-consumer-{c}", daemon=True, args=(
                ring.name, c, n_producers, n_consumers, k, r, args.take_batch, verify, expected[:n_producers],
                args.write_batch, args.intact_check, progress, barrier, results, poll_s, args.timeout,
                args.profile, args.consumer_read)))
        for pr in procs:
            pr.start()
        got = _collect(results, procs, n_producers + n_consumers, args.timeout + 60, what)
        producers = [g for g in got if g["role"] == "producer"]
        consumers = [g for g in got if g["role"] == "consumer"]
        occupancy = ring.occupancy()
        checksum_errors = ring.header.checksum_errors
        generated = ring.header.generated
        graceful = True
    finally:
        _stop(procs, barrier, graceful)
        ring.close()
    total = n_producers * k
    wall = max(g["t_last"] for g in consumers) - min(g["t_start"] for g in got)
    intact = intactness(consumers, total)
    intact["all_pairs_intact"] = bool(intact["all_pairs_intact"] and checksum_errors == 0 and generated == total
                                      and occupancy["free"] == args.slots)
    return {"producers": n_producers, "consumers": n_consumers, "checksums": verify, "pairs": total, "wall_s": wall,
            "pairs_s": total / wall, "gb_s": total * pair_bytes(r) / wall / 1e9,
            "ring_checksum_errors": int(checksum_errors), "ring_generated": int(generated),
            "ring_occupancy_after": occupancy, "lead_positions": args.slots // n_producers,
            "producer_stats": {key: sum(g[key] for g in producers)
                               for key in ("reserve_calls", "reserve_short", "waits_ring_full", "waits_ahead")},
            "consumer_stats": {"takes": sum(g["takes"] for g in consumers),
                               "empty_takes": sum(g["empty_takes"] for g in consumers),
                               "check_s": sum(g["check_s"] for g in consumers)},
            # Seconds inside each call, summed over the processes of a role, per pair (wall time: it includes
            # time a process spent descheduled while inside the call). flock/crc32 only with --profile.
            "us_per_pair": {role: {key: 1e6 * sum(g["seconds"].get(key, 0.0) for g in group) / total
                                   for key in group[0]["seconds"]}
                            for role, group in (("producer", producers), ("consumer", consumers))},
            **intact}


def run_queue(args: argparse.Namespace, r: int, n_producers: int, n_consumers: int, k: int, expected: list) -> dict:
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    what = f"queue R={r} P={n_producers} C={n_consumers}"
    procs: list = []
    barrier, graceful = None, False
    q = ctx.Queue(maxsize=args.slots)
    results = ctx.Queue()
    done = ctx.Event()
    try:
        sentinels = ctx.Value("i", 0)
        barrier = ctx.Barrier(n_producers + n_consumers)
        for p in range(n_producers):
            procs.append(ctx.Process(target=queue_producer, name=f"queue-producer-{p}", daemon=True, args=(
                q, p, k, r, args.write_batch, args.seed, args.sharing_strategy, barrier, results, done,
                args.timeout)))
        for c in range(n_consumers):
            procs.append(ctx.Process(target=queue_consumer, name=f"queue-consumer-{c}", daemon=True, args=(
                q, c, n_producers, k, r, args.take_batch, expected[:n_producers], args.write_batch, args.intact_check,
                args.sharing_strategy, sentinels, barrier, results, args.timeout, args.consumer_read)))
        for pr in procs:
            pr.start()
        got = _collect(results, procs, n_producers + n_consumers, args.timeout + 60, what)
        graceful = True
    finally:
        done.set()
        _stop(procs, barrier, graceful)
        q.close()
        q.cancel_join_thread()
    producers = [g for g in got if g["role"] == "producer"]
    consumers = [g for g in got if g["role"] == "consumer"]
    total = n_producers * k
    wall = max(g["t_last"] for g in consumers) - min(g["t_start"] for g in got)
    return {"producers": n_producers, "consumers": n_consumers, "pairs": total, "wall_s": wall,
            "pairs_s": total / wall, "gb_s": total * pair_bytes(r) / wall / 1e9,
            "sharing_strategy": producers[0]["strategy"], "allocation": producers[0]["allocation"],
            "consumer_stats": {"gets": sum(g["gets"] for g in consumers),
                               "empty_gets": sum(g["empty_gets"] for g in consumers),
                               "check_s": sum(g["check_s"] for g in consumers)},
            **intactness(consumers, total)}


def run_memcpy(args: argparse.Namespace, r: int, n_pairs: int) -> dict:
    """np.copyto of the same bytes, same chunking, one process: pool -> ring-sized array in ``write_batch``
    chunks (producer side), then, when consumers copy (``--consumer-read copy``), ring-sized array ->
    (take_batch, ...) buffer in ``take_batch`` chunks (consumer side), ``slots`` pairs at a time."""
    wb, tb = args.write_batch, args.take_batch
    pool = make_pool(args.seed, r, 0, wb)
    dest = np.zeros((args.slots, 2, 3, r, r), dtype=np.uint8)
    out = np.zeros((tb, 2, 3, r, r), dtype=np.uint8)
    rounds = []
    for _ in range(args.memcpy_repeats):
        t_write = t_read = 0.0
        done = 0
        while done < n_pairs:
            block = min(args.slots, n_pairs - done)
            t0 = time.perf_counter()
            for s in range(0, block, wb):
                e = min(block, s + wb)
                np.copyto(dest[s:e], pool[: e - s])
            t1 = time.perf_counter()
            for s in range(0, block, tb) if args.consumer_read == "copy" else ():
                e = min(block, s + tb)
                np.copyto(out[: e - s], dest[s:e])
            t_write += t1 - t0
            t_read += time.perf_counter() - t1
            done += block
        rounds.append((t_write, t_read))
    total = [w + rd for w, rd in rounds]
    med = sorted(range(len(rounds)), key=lambda i: total[i])[len(rounds) // 2]
    w, rd = rounds[med]
    nbytes = n_pairs * pair_bytes(r)
    return {"pairs": n_pairs, "repeats": args.memcpy_repeats, "gb_s": nbytes / (w + rd) / 1e9,
            "pairs_s": n_pairs / (w + rd), "write_gb_s": nbytes / w / 1e9, "read_gb_s": nbytes / rd / 1e9 if args.consumer_read == "copy" else None,
            "copies": 2 if args.consumer_read == "copy" else 1,
            "round_s": total}


# ----------------------------------------------------------------------------- machine info

def measured(retries: int, fn, *fn_args) -> dict:
    """Run one measurement and record how many cores other processes used meanwhile (they skew it). A skewed
    run is repeated up to ``retries`` times; the least skewed attempt is kept."""
    best = None
    for attempt in range(1 + retries):
        before = cpu_snapshot()
        row = fn(*fn_args)  # joins its workers, so their CPU time is in own_cpu_s()
        row["other_processes_cores"] = other_cores_since(before)
        row["attempts"] = attempt + 1
        if best is None or (row["other_processes_cores"] or 0) < (best["other_processes_cores"] or 0):
            best = {**row, "attempts": attempt + 1}
        if not _skewed(row):
            break
    best["attempts"] = attempt + 1
    return best


def own_segments() -> list[str]:
    """Ring segments this process created that still exist (there should be none after a run)."""
    return sorted(p.name for p in SHM_DIR.glob(f"{NAME_PREFIX}{os.getpid()}-*"))


# ----------------------------------------------------------------------------- output

def _skewed(row: dict | None) -> bool:
    return bool(row) and (row.get("other_processes_cores") or 0) > SKEW_CORES


def _verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "n/a"
    return "PASS" if ratio >= target else "MISS"


def derive(res: dict) -> None:
    """Ratios and PASS/MISS per ring row, in place."""
    for block in res["resolutions"]:
        mem = block["memcpy"]["gb_s"]
        queues = {(q["producers"], q["consumers"]): q for q in block["queue"]}
        for row in block["ring"]:
            q = queues.get((row["producers"], row["consumers"]))
            row["x_memcpy"] = row["gb_s"] / mem
            row["x_queue"] = row["pairs_s"] / q["pairs_s"] if q else None
            row["queue_pairs_s"] = q["pairs_s"] if q else None
            row["memcpy_target"] = _verdict(row["x_memcpy"], TARGET_MEMCPY)
            row["queue_target"] = _verdict(row["x_queue"], TARGET_QUEUE)


def evaluate_targets(own_core: list[dict], cores: int) -> list[dict]:
    """Both targets over the rows where every process has a core of its own (they compare designs, not CPU
    schedulers), judged by the worst such row; not measured here when there is none."""
    detail = f"worst of {len(own_core)} row(s) with P + C <= {cores}"
    queue = [row["x_queue"] for row in own_core if row["x_queue"] is not None]
    return [target("ring GB/s vs memcpy GB/s, a core per process", min((row["x_memcpy"] for row in own_core),
                                                                       default=None), TARGET_MEMCPY, detail=detail),
            target("ring pairs/s vs Queue pairs/s at the same P, C, a core per process", min(queue, default=None),
                   TARGET_QUEUE, detail=detail)]


def format_report(res: dict) -> str:
    m, cfg = res["meta"], res["config"]
    lines = [
        f"machine     {m['cpu']} ({m['cpu_count']} logical cores), {m['shm_free_gib']:.1f} GiB free in {SHM_DIR}",
        f"versions    python {m['python']}, numpy {m['numpy']}, torch {m['torch']}",
        f"date        {m['date']}",
        load_line(m),
        f"setup       {cfg['slots']} slots, write batch {cfg['write_batch']}, take batch {cfg['take_batch']}, max_reuse=1; "
        f"consumers read {cfg['consumer_read']}, check {cfg['intact_check']}; Queue: torch.multiprocessing spawn, maxsize {cfg['slots']}, "
        f"sharing strategy {res.get('queue_sharing_strategy') or 'n/a'}",
        f"targets     ring GB/s >= {TARGET_MEMCPY}x memcpy GB/s; ring pairs/s >= {TARGET_QUEUE:g}x Queue pairs/s "
        f"at the same P, C",
        "NOTE        " + m["contention_note"],
    ]
    for block in res["resolutions"]:
        r, mem = block["resolution"], block["memcpy"]
        lines += [
            "",
            f"R = {r}: pair {pair_bytes(r):,} B, K = "
            + "/".join(str(v) for v in block["pairs_per_producer"].values())
            + f" pairs per producer for P = {'/'.join(block['pairs_per_producer'])}; memcpy "
            f"(1 process, {mem['copies']} cop{'ies' if mem['copies'] > 1 else 'y'}) {mem['gb_s']:.2f} GB/s = "
            f"{mem['pairs_s']:,.0f} pairs/s"
            + (f" (write side {mem['write_gb_s']:.2f}, read side {mem['read_gb_s']:.2f} GB/s)" if mem["read_gb_s"] else "")
            + ("  !" if _skewed(mem) else ""),
            f"  {'P':>2} {'C':>2} {'crc':>4}  {'ring pairs/s':>12} {'GB/s':>6}  {'Queue pairs/s':>13}  "
            f"{'x memcpy':>8} {'>=' + str(TARGET_MEMCPY):>5}  {'x Queue':>8} {'>=' + format(TARGET_QUEUE, 'g'):>5}  intact",
        ]
        queues = {(q["producers"], q["consumers"]): q for q in block["queue"]}
        for row in block["ring"]:
            xq = "n/a" if row["x_queue"] is None else f"{row['x_queue']:.2f}x"
            qps = "n/a" if row["queue_pairs_s"] is None else f"{row['queue_pairs_s']:,.0f}"
            lines.append(
                f"  {row['producers']:>2} {row['consumers']:>2} {'on' if row['checksums'] else 'off':>4}  "
                f"{row['pairs_s']:>12,.0f} {row['gb_s']:>6.2f}  {qps:>13}  {row['x_memcpy']:>7.2f}x {row['memcpy_target']:>5}  "
                f"{xq:>8} {row['queue_target']:>5}  {'yes' if row['all_pairs_intact'] else 'NO':>6}"
                + ("  !" if _skewed(row) or _skewed(queues.get((row["producers"], row["consumers"]))) else ""))
        bad_q = [q for q in block["queue"] if not q["all_pairs_intact"]]
        if bad_q:
            lines.append(f"  WARNING: the Queue lost, duplicated or corrupted pairs in {len(bad_q)} configuration(s)")
    if cfg.get("profile"):
        lines += ["", "Cost breakdown (--profile): microseconds per pair inside each call, summed over the processes of a "
                      "role; wall time, so it includes time a process sat descheduled inside the call",
                  f"  {'R':>4} {'P':>2} {'C':>2} {'crc':>4} | producer {'reserve':>7} {'write':>7} {'crc32':>7} "
                  f"{'publish':>7} {'flock':>7} {'wait':>7} | consumer {'take':>7} {'crc32':>7} {'flock':>7} "
                  f"{'rest':>7} {'check':>7} {'wait':>7}"]
        for block in res["resolutions"]:
            for row in block["ring"]:
                pr, co = row["us_per_pair"]["producer"], row["us_per_pair"]["consumer"]
                rest = co["take"] - co.get("crc32", 0.0) - co.get("flock", 0.0)
                lines.append(
                    f"  {block['resolution']:>4} {row['producers']:>2} {row['consumers']:>2} "
                    f"{'on' if row['checksums'] else 'off':>4} |          {pr['reserve']:>7.1f} {pr['write']:>7.1f} "
                    f"{pr.get('crc32', 0.0):>7.1f} {pr['publish']:>7.1f} {pr.get('flock', 0.0):>7.1f} {pr['wait']:>7.1f} "
                    f"|          {co['take']:>7.1f} {co.get('crc32', 0.0):>7.1f} {co.get('flock', 0.0):>7.1f} "
                    f"{rest:>7.1f} {co['check']:>7.1f} {co['wait']:>7.1f}")
        lines.append("  producer: write = copy in + crc32 (PairRing.write always computes it); flock counted inside "
                     "reserve + publish. consumer: rest = take - crc32 - flock = metadata scan, copy out, bookkeeping")
    rows = [row for block in res["resolutions"] for row in block["ring"]]
    if any(_skewed(x) for block in res["resolutions"] for x in [block["memcpy"], *block["ring"], *block["queue"]]):
        lines += ["", f"! = other processes used more than {SKEW_CORES} cores on average during this row's ring or "
                      f"Queue run, even after {cfg['retries']} repeat(s) (other_processes_cores and attempts in the JSON): "
                      f"that row is skewed"]
    s = res["summary"]
    lines += ["", f"summary     rows with a core per process (P + C <= {m['cpu_count']}): memcpy target "
                  f"{s['own_core_memcpy_pass']}/{s['own_core_rows']} PASS, Queue target {s['own_core_queue_pass']}/"
                  f"{s['own_core_queue_rows']} PASS",
              f"            all rows: memcpy target {s['memcpy_pass']}/{len(rows)} PASS, Queue target "
              f"{s['queue_pass']}/{s['queue_rows']} PASS; every pair intact in every run: "
              f"{'yes' if s['all_pairs_intact'] else 'NO'}", "", "Targets",
              *(target_line(t) for t in res["targets"])]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/ring.py")

    blocks = res["resolutions"]
    n_configs = max(len({(row["producers"], row["consumers"]) for row in b["ring"]}) for b in blocks)
    fig, axes = plt.subplots(len(blocks), 1, figsize=(max(7.0, 0.9 * n_configs + 3), 4.2 * len(blocks)),
                             squeeze=False)
    for ax, block in zip(axes[:, 0], blocks):
        configs = sorted({(row["producers"], row["consumers"]) for row in block["ring"]})
        x = np.arange(len(configs))
        series = [(f"ring, checksums {'on' if v else 'off'}", lambda pc, v=v: next(
            (row["gb_s"] for row in block["ring"] if (row["producers"], row["consumers"]) == pc
             and row["checksums"] == v), np.nan)) for v in res["config"]["verify"]]
        series.append(("torch.multiprocessing Queue", lambda pc: next(
            (q["gb_s"] for q in block["queue"] if (q["producers"], q["consumers"]) == pc), np.nan)))
        width = 0.8 / len(series)
        for i, (label, value) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [value(pc) for pc in configs], width, label=label)
        mem = block["memcpy"]["gb_s"]
        ax.axhline(mem, color="black", lw=1.2, label=f"memcpy x2, 1 process ({mem:.2f})")
        ax.axhline(TARGET_MEMCPY * mem, color="black", lw=1, ls="--", label=f"{TARGET_MEMCPY}x memcpy target")
        ax.set_xticks(x, [f"P{p} C{c}" for p, c in configs])
        ax.set_xlabel("producers P, consumers C")
        ax.set_ylabel("GB/s (pairs x 2*3*R*R bytes / wall s)")
        ax.set_title(f"R = {block['resolution']} ({pair_bytes(block['resolution']) / 2**20:.2f} MiB per pair)")
        ax.set_ylim(0, 1.45 * max([mem] + [row["gb_s"] for row in block["ring"]] + [q["gb_s"] for q in block["queue"]]))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, ncol=2, loc="upper left")
    m = res["meta"]
    fig.suptitle(f"{m['cpu']}, {m['cpu_count']} cores: with P + C > cores the rates are contention-bound", fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: unlink the ring
    out = results_path(args.out, "bench/ring.py")
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch  # after parsing, so --help stays fast; the workers of the ring runs never import it

    configs = [(p, c) for p in args.producers for c in args.consumers]
    n_runs = len(args.resolutions) * (1 + len(configs) * (len(args.verify) + (0 if args.no_queue else 1)))
    load_before, before = os.getloadavg()[0], cpu_snapshot()
    blocks = []
    try:
        with tqdm(total=n_runs, unit="run", dynamic_ncols=True) as bar:
            for r in args.resolutions:
                if args.slots * pair_bytes(r) > shutil.disk_usage(SHM_DIR).free * 0.8:
                    sys.exit(f"bench/ring.py: {args.slots} slots of {pair_bytes(r)} B do not fit in {SHM_DIR}; "
                             f"lower --slots")
                expected = [expected_sums(make_pool(args.seed, r, p, args.write_batch))
                            for p in range(max(args.producers))]
                bar.set_description(f"R={r} memcpy")
                memcpy = measured(args.retries, run_memcpy, args, r, pairs_per_producer(args, r, 1))
                bar.update()
                ring_rows, queue_rows = [], []
                # Interleaved, so that drift of the machine hits the ring and the Queue alike.
                for p, c in configs:
                    k = pairs_per_producer(args, r, p)
                    if not args.no_queue:
                        bar.set_description(f"R={r} P={p} C={c} Queue")
                        queue_rows.append(measured(args.retries, run_queue, args, r, p, c, k, expected))
                        bar.update()
                    for verify in args.verify:
                        bar.set_description(f"R={r} P={p} C={c} ring crc {'on' if verify else 'off'}")
                        ring_rows.append(measured(args.retries, run_ring, args, r, p, c, k, verify, expected))
                        bar.update()
                blocks.append({"resolution": r, "pair_bytes": pair_bytes(r),
                               "pairs_per_producer": {str(p): pairs_per_producer(args, r, p) for p in args.producers},
                               "memcpy": memcpy, "ring": ring_rows, "queue": queue_rows})
    except KeyboardInterrupt:
        print("\nbench/ring.py: interrupted; every ring segment has been unlinked", file=sys.stderr)
        sys.exit(130)

    other_cores = other_cores_since(before)
    max_procs = max(args.producers) + max(args.consumers)
    res = {
        "meta": {
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "platform": platform.platform(),
            "shm_free_gib": shutil.disk_usage(SHM_DIR).free / 2**30,
            **run_meta(load_before, other_cores, args.quick, "bench/ring.py", argv),
            "contention_note": CONTENTION_NOTE.format(cores=os.cpu_count(), procs=max_procs),
        },
        "config": {"resolutions": args.resolutions, "producers": args.producers, "consumers": args.consumers,
                   "slots": args.slots, "write_batch": args.write_batch, "take_batch": args.take_batch,
                   "verify": args.verify, "intact_check": args.intact_check, "poll_ms": args.poll_ms,
                   "mib_per_config": args.mib_per_config, "pairs": args.pairs, "seed": args.seed,
                   "queue": not args.no_queue, "sharing_strategy_flag": args.sharing_strategy,
                   "profile": args.profile, "retries": args.retries, "consumer_read": args.consumer_read,
                   "targets": {"x_memcpy": TARGET_MEMCPY, "x_queue": TARGET_QUEUE}},
        "resolutions": blocks,
    }
    strategies = {q["sharing_strategy"] for b in blocks for q in b["queue"]}
    res["queue_sharing_strategy"] = ",".join(sorted(strategies)) or None
    derive(res)
    rows = [row for b in blocks for row in b["ring"]]
    cores = os.cpu_count() or 1
    own_core = [row for row in rows if row["producers"] + row["consumers"] <= cores]
    res["summary"] = {
        "memcpy_pass": sum(row["memcpy_target"] == "PASS" for row in rows),
        "queue_pass": sum(row["queue_target"] == "PASS" for row in rows),
        "queue_rows": sum(row["x_queue"] is not None for row in rows), "ring_rows": len(rows),
        # The targets compare designs, not CPU schedulers: rows where every process has a core of its own.
        "own_core_rows": len(own_core),
        "own_core_memcpy_pass": sum(row["memcpy_target"] == "PASS" for row in own_core),
        "own_core_queue_pass": sum(row["queue_target"] == "PASS" for row in own_core),
        "own_core_queue_rows": sum(row["x_queue"] is not None for row in own_core),
        "all_pairs_intact": all(row["all_pairs_intact"] for row in rows)
        and all(q["all_pairs_intact"] for b in blocks for q in b["queue"]),
    }
    res["targets"] = evaluate_targets(own_core, cores)
    res["meta"]["segments_left"] = own_segments()
    save_results(res, out, plot, format_report, _T0, gap=True)
    return res


if __name__ == "__main__":
    main()
