"""``cache warm``: generate the variations of every training image into the cache up front.

The paper precomputed its synthetic images before training; this is that step as one command,
with the producers' own generator, seeds and cache format, so a warmed cache holds exactly the
pairs an online run would have generated: variation k of image i has the seed
``variation_seed(generator.seed, i, k)`` and is stored with ``epoch=k``.

Generation workers (:mod:`onlinemix.generation.worker`, one per generator device) each load the generator,
report its fingerprint, receive their share of the missing (image, variation) pairs from the
parent and write them to the cache through their own ``ShardWriter``. Only small integers travel back (pairs done), so
the parent's progress bar costs nothing. A killed warm loses at most each worker's unflushed
shard, and the next warm generates only what is still missing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.synchronize import Event

import numpy as np
import torch
from tqdm.auto import tqdm

from onlinemix.cache import (
    CacheError,
    CacheReader,
    cache_key,
    check_writable,
    generator_description,
    recorded_noise,
    writer_for,
)
from onlinemix.core.config import Config
from onlinemix.core.devices import NodeLaunch, producer_devices
from onlinemix.core.schedule import variation_seed
from onlinemix.data import RealImages, load_real_images, select_train_ids
from onlinemix.generation.generator import VariationGenerator
from onlinemix.generation.worker import CacheSink, Pairs, Sink, Work, WorkerDied, WorkerPool, WorkerSpec

POLL_S = 0.5


@dataclass
class WarmResult:
    key: str
    generated: int
    skipped: int
    seconds: float          # in all, including process start and generator loading
    generate_seconds: float  # from handing out the work to the end
    interrupted: KeyboardInterrupt | None  # what stopped it (Ctrl-C, SIGTERM); None when it ran to the end


def default_workers() -> int:
    """One worker per visible GPU, or one on the CPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def missing_pairs(reader: CacheReader, train_ids: np.ndarray, base_seed: int, variations: int,
                  noise: float = 0.0) -> np.ndarray:
    """(image id, variation k) rows the cache lacks, variation-major: the first variation of every
    image comes before any second one, so a partial warm already covers the whole dataset.
    A pair counts as present when the cache holds that image with that seed and noise level (they fix the output)."""
    rows = []
    noise = recorded_noise(noise)
    for k in range(variations):
        for i in train_ids.tolist():
            seed = variation_seed(base_seed, i, k)
            if not any(v.seed == seed and v.noise == noise for v in reader.variations(i)):
                rows.append((i, k))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


class RowsWork:
    """Warm work: this worker's share of the missing (image id, variation k) rows, in generator batches."""

    def __init__(self, rows: np.ndarray, batch_size: int, base_seed: int, stop: Event) -> None:
        self.rows = rows
        self.batch_size = batch_size
        self.base_seed = base_seed
        self.stop = stop
        self.next_row = 0

    def finished(self) -> bool:
        return self.stop.is_set() or self.next_row >= len(self.rows)

    def next(self) -> Work:
        rows = self.rows[self.next_row:self.next_row + self.batch_size]
        self.next_row += len(rows)
        ids, ks = rows[:, 0], rows[:, 1]
        seeds = [variation_seed(self.base_seed, int(i), int(k)) for i, k in zip(ids, ks, strict=True)]
        return Work(ids, seeds, ks, np.zeros_like(ids))

    def done(self, work: Work, seconds: float) -> None:
        pass


class ProgressSink:
    """Tells the parent how many pairs are done (small integers only: its progress bar costs nothing)."""

    def __init__(self, events: mp.Queue, index: int) -> None:
        self.events = events
        self.index = index

    def put(self, pairs: Pairs) -> None:
        self.events.put(("done", self.index, len(pairs.work.ids)))

    def close(self) -> None:
        pass


@dataclass
class WarmJob:
    """The warm worker's job: rows from the parent in; pairs to the cache (and a count to the parent)."""
    tasks: mp.Queue
    events: mp.Queue
    stop: Event
    kind: str = "warm worker"

    @contextmanager
    def session(self, spec: WorkerSpec, generator: VariationGenerator,
                real: RealImages) -> Iterator[tuple[RowsWork, list[Sink]]]:
        cfg = spec.cfg
        self.events.put(("ready", spec.index, generator_description(generator, cfg.data.dataset)))
        rows = self.tasks.get()  # sent once every worker is ready and the parent knows what is missing
        rows = np.empty((0, 2), dtype=np.int64) if rows is None else rows
        writer = writer_for(cfg, generator)  # the parent's key: every worker's fingerprint agrees
        yield RowsWork(rows, cfg.generator.batch_size, cfg.generator.seed, self.stop), \
            [CacheSink(writer, required=True), ProgressSink(self.events, spec.index)]
        self.events.put(("finished", spec.index, writer.committed))


# ----------------------------------------------------------------------------- parent

class _Workers:
    """The warm workers, their task queues and the event queue they report through."""

    def __init__(self, cfg: Config, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.events, self.stop = ctx.Queue(), ctx.Event()
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.pool = WorkerPool([WorkerSpec(i, cfg, device, os.getpid(), None, WarmJob(self.tasks[i], self.events, self.stop))
                                for i, device in enumerate(producer_devices(NodeLaunch.detect(trainers=0), n, [],
                                                                            count_name="--producers"))],
                                max_restarts=0)
        self.pool.start()

    @property
    def count(self) -> int:
        return len(self.tasks)

    def next_event(self) -> tuple | None:
        """The next worker message, or None; raises, with the worker's own error message, when one died."""
        try:
            self.pool.check()
        except WorkerDied as e:
            raise CacheError(str(e)) from None
        try:
            return self.events.get(timeout=POLL_S)
        except queue.Empty:
            return None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.stop.set()
        for q in self.tasks:
            q.put(None)  # releases a worker still waiting for its share
            q.cancel_join_thread()  # a dead worker's unread share must not block our exit
        self.pool.stop(timeout_s)

    def drain_done(self) -> int:
        """Pairs reported after the parent stopped listening (a Ctrl-C lets each worker finish its batch)."""
        done = 0
        while True:
            try:
                event = self.events.get(timeout=0.1)
            except (queue.Empty, OSError, EOFError):
                return done
            done += event[2] if event[0] == "done" else 0


def _gather_ready(workers: _Workers) -> dict:
    """Every worker's generator description; they must agree (same fingerprint on every device)."""
    descs: dict[int, dict] = {}
    while len(descs) < workers.count:
        event = workers.next_event()
        if event is not None:
            descs[event[1]] = event[2]
    fingerprints = {d["fingerprint"] for d in descs.values()}
    if len(fingerprints) > 1:
        raise CacheError(f"the workers' generators differ ({sorted(fingerprints)}): use identical devices")
    return descs[0]


def warm(cfg: Config, variations: int, workers: int) -> WarmResult:
    """Generate the missing variations 0..variations-1 of every training image into ``cfg.cache_root()``."""
    root = cfg.cache_root()
    check_writable(root)
    real = load_real_images(cfg.data, cfg.store_root())
    train_ids = select_train_ids(real, cfg.data).numpy()  # the images runs train on
    started = time.perf_counter()
    pool = _Workers(cfg, workers)
    key, generated, skipped, interrupted = "(not known yet)", 0, 0, None
    generate_started = None
    try:
        desc = _gather_ready(pool)
        key = cache_key(desc["fingerprint"], cfg.data.dataset)
        todo = missing_pairs(CacheReader(root, key, real.size, verify=False), train_ids,
                             cfg.generator.seed, variations, cfg.generator.noise)
        skipped = len(train_ids) * variations - len(todo)
        print(f"cache key {key}: {skipped} of {len(train_ids) * variations} pairs already cached, "
              f"{len(todo)} to generate with {workers} worker(s)", file=sys.stderr)
        generate_started = time.perf_counter()
        for i, q in enumerate(pool.tasks):
            q.put(todo[i::workers])
        finished = 0
        with tqdm(total=len(todo), unit="pair", dynamic_ncols=True, desc="warm") as bar:
            while finished < workers:
                event = pool.next_event()
                if event is None:
                    continue
                if event[0] == "done":
                    generated += event[2]
                    bar.update(event[2])
                elif event[0] == "finished":
                    finished += 1
    except KeyboardInterrupt as e:
        interrupted = e
    finally:
        pool.shutdown()
        generated += pool.drain_done()
    end = time.perf_counter()
    return WarmResult(key, generated, skipped, end - started, end - (generate_started or end), interrupted)


def summary(result: WarmResult) -> str:
    rate = result.generated / result.generate_seconds if result.generate_seconds > 0 else 0.0
    head = "warm interrupted (committed shards kept; run it again to resume)" if result.interrupted else "warm done"
    return (f"{head}: generated {result.generated} pairs, skipped {result.skipped} already cached, "
            f"{rate:.1f} pairs/s while generating ({result.seconds:.1f}s in all, with start-up); key {result.key}")
