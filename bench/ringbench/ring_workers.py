"""The processes of a ring run: producers that write pairs into one ``PairRing`` and consumers that borrow
(or take) them by id, each timing its calls. They are spawned; they never import torch."""

from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import closing, contextmanager
from multiprocessing.queues import Queue

import numpy as np

from onlinemix.exchange.ring import PairRing

from .pairs import PairChecker, consumer_ids, make_pool, stamps
from .profiling import profile_ring_module

MAX_AGE = 1 << 40  # no pair ever expires here


@contextmanager
def reporting(results: Queue, role: str, index: int) -> Iterator[None]:
    """Send an error of the block to the parent as this worker's result (the parent then fails the run at
    once, with the traceback), rather than let the parent wait for a result that never comes."""
    try:
        yield
    except Exception:
        results.put({"role": role, "index": index, "error": traceback.format_exc()})


def worker_start() -> None:
    """Ignore Ctrl-C: it goes to the whole process group, and the parent handles it and ends its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def touch(a: np.ndarray) -> None:
    """Map every page of ``a`` into this process before the clock starts (a long-lived process has)."""
    flat = a.reshape(-1)
    int(flat[::4096].sum())


def ring_producer(name: str, p: int, k: int, r: int, write_batch: int, lead: int, seed: int, progress,
                  barrier, results, poll_s: float, timeout: float, profile: bool) -> None:
    """Write pairs p*k .. p*k+k-1 (positions 0..k-1) in reserve/write/publish chunks of ``write_batch``.

    Flow control: never more than ``lead`` positions ahead of the slowest consumer (the package's
    producers bound their claims by the unserved pairs waiting instead), so the P producers never
    hold more than P * lead <= slots pairs nobody is asking for yet. While reserve() finds no free
    slot (the ring is full), wait and retry.
    """
    worker_start()
    with reporting(results, "producer", p), closing(PairRing.attach(name)) as ring:
        pool = make_pool(seed, r, p, write_batch)
        id_words = stamps(pool)
        prog = np.frombuffer(progress, dtype=np.int64)
        touch(ring.pixels)
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
                poll_wait(poll_s, deadline, "producer waits for consumers")
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
                poll_wait(poll_s, deadline, "producer waits for a free slot")
                seconds["wait"] += clock() - t0
                continue
            checksums = []
            t0 = clock()
            for i in range(len(slots)):
                j = (pos + i) % write_batch
                id_words[j] = base + pos + i
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


def ring_consumer(name: str, c: int, n_producers: int, n_consumers: int, k: int, r: int, take_batch: int,
                  verify: bool, expected, write_batch: int, check_mode: str, progress, barrier, results,
                  poll_s: float, timeout: float, profile: bool, read: str) -> None:
    """Borrow (or take) this consumer's ids, ``take_batch`` at a time, in order; ids not found stay in the
    next request."""
    worker_start()
    with reporting(results, "consumer", c), closing(PairRing.attach(name)) as ring:
        mine = consumer_ids(c, n_producers, n_consumers, k)
        check = PairChecker(expected, k, write_batch, check_mode)
        out = np.zeros((take_batch, 2, 3, r, r), dtype=np.uint8)
        prog = np.frombuffer(progress, dtype=np.int64)
        received: list[np.ndarray] = []
        bad = takes = empty_takes = 0
        window, nxt = mine[:take_batch], min(take_batch, len(mine))
        touch(ring.pixels)
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
                poll_wait(poll_s, deadline, "consumer waits for pairs")
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


def poll_wait(seconds: float, deadline: float, what: str) -> None:
    """Sleep one poll interval, or fail when the configuration is past its ``deadline`` (--timeout)."""
    if time.perf_counter() > deadline:
        raise TimeoutError(f"{what} past --timeout")
    time.sleep(seconds)
