"""One measurement of the ring benchmark: a ring run, a Queue run (P producer and C consumer processes,
spawned, started together at a barrier) or the memcpy baseline; each repeated while the machine was busy."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_module
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext

import numpy as np
from machine import SKEW_CORES, cpu_snapshot, other_cores_since

from onlinemix.exchange.ring import NAME_PREFIX, SHM_DIR, PairRing

from .pairs import intactness, make_pool, pair_bytes
from .queue_workers import queue_consumer, queue_producer
from .ring_workers import ring_consumer, ring_producer


def skewed(row: dict | None) -> bool:
    """Whether other processes used more than ``SKEW_CORES`` while ``row`` was measured."""
    return bool(row) and (row.get("other_processes_cores") or 0) > SKEW_CORES


def start(procs: list, ctx: BaseContext, name: str, target: Callable, count: int,
          args_of: Callable[[int], tuple]) -> None:
    """Start ``count`` daemon processes running ``target`` with ``args_of(index)``, named <name>-<index>; each
    joins ``procs`` before it starts, so that ``stop(procs)`` reaches every started one."""
    for i in range(count):
        procs.append(ctx.Process(target=target, name=f"{name}-{i}", daemon=True, args=args_of(i)))
        procs[-1].start()


def collect(results, procs: list, n: int, timeout: float, what: str) -> list[dict]:
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


def stop(procs: list, barrier=None, graceful: bool = True) -> None:
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


def by_role(got: list[dict]) -> tuple[list[dict], list[dict]]:
    """The workers' results split into the producers' and the consumers'."""
    return [g for g in got if g["role"] == "producer"], [g for g in got if g["role"] == "consumer"]


def moved(got: list[dict], total: int, r: int) -> dict:
    """The rate of a run: ``total`` pairs from the first worker's start to the last pair consumed."""
    wall = max(g["t_last"] for g in got if g["role"] == "consumer") - min(g["t_start"] for g in got)
    return {"pairs": total, "wall_s": wall, "pairs_s": total / wall, "gb_s": total * pair_bytes(r) / wall / 1e9}


def run_ring(args: argparse.Namespace, r: int, n_producers: int, n_consumers: int, k: int, verify: bool,
             expected: list) -> dict:
    """P producers write K pairs each into a new ring of ``--slots`` slots, C consumers borrow (or take) them,
    checksums verified on every borrow or not; the ring is unlinked afterwards, whatever happens."""
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
        start(procs, ctx, "ring-producer", ring_producer, n_producers, lambda p: (
            ring.name, p, k, r, args.write_batch, lead, args.seed, progress, barrier, results, poll_s,
            args.timeout, args.profile))
        start(procs, ctx, "ring-consumer", ring_consumer, n_consumers, lambda c: (
            ring.name, c, n_producers, n_consumers, k, r, args.take_batch, verify, expected[:n_producers],
            args.write_batch, args.intact_check, progress, barrier, results, poll_s, args.timeout,
            args.profile, args.consumer_read))
        got = collect(results, procs, n_producers + n_consumers, args.timeout + 60, what)
        producers, consumers = by_role(got)
        occupancy = ring.occupancy()
        checksum_errors = ring.header.checksum_errors
        generated = ring.header.generated
        graceful = True
    finally:
        stop(procs, barrier, graceful)
        ring.close()
    total = n_producers * k
    intact = intactness(consumers, total)
    intact["all_pairs_intact"] = bool(intact["all_pairs_intact"] and checksum_errors == 0 and generated == total
                                      and occupancy["free"] == args.slots)
    return {"producers": n_producers, "consumers": n_consumers, "checksums": verify, **moved(got, total, r),
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
    """The same P producers and C consumers passing the same pairs through a ``torch.multiprocessing`` Queue
    holding as many items as the ring has slots."""
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
        start(procs, ctx, "queue-producer", queue_producer, n_producers, lambda p: (
            q, p, k, r, args.write_batch, args.seed, args.sharing_strategy, barrier, results, done, args.timeout))
        start(procs, ctx, "queue-consumer", queue_consumer, n_consumers, lambda c: (
            q, c, n_producers, k, r, args.take_batch, expected[:n_producers], args.write_batch, args.intact_check,
            args.sharing_strategy, sentinels, barrier, results, args.timeout, args.consumer_read))
        got = collect(results, procs, n_producers + n_consumers, args.timeout + 60, what)
        graceful = True
    finally:
        done.set()
        stop(procs, barrier, graceful)
        q.close()
        q.cancel_join_thread()
    producers, consumers = by_role(got)
    total = n_producers * k
    return {"producers": n_producers, "consumers": n_consumers, **moved(got, total, r),
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
            "pairs_s": n_pairs / (w + rd), "write_gb_s": nbytes / w / 1e9,
            "read_gb_s": nbytes / rd / 1e9 if args.consumer_read == "copy" else None,
            "copies": 2 if args.consumer_read == "copy" else 1,
            "round_s": total}


def measured(retries: int, fn: Callable[..., dict], *fn_args) -> dict:
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
        if not skewed(row):
            break
    best["attempts"] = attempt + 1
    return best


def own_segments() -> list[str]:
    """Ring segments this process created that still exist (there should be none after a run)."""
    return sorted(p.name for p in SHM_DIR.glob(f"{NAME_PREFIX}{os.getpid()}-*"))
