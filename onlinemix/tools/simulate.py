"""A simulator of the online system: the product's own ring, producer and lookup rules on a virtual clock.

Nothing here decides which slot a producer evicts, which positions it claims, which view serves a
request, or when a view is retired or too old: the simulator calls the code that does, on a ring in
this process's memory (:meth:`PairRing.local`, 1-pixel pairs) whose birth times come from the virtual
clock. Producers take their work from :class:`~onlinemix.generation.producer.RingWork` (claims ahead of the
trainers by the measured lead, images with an unused view skipped) and write with
:meth:`ProducerPort.place`; trainers drive the trainer's own lookup, :class:`~onlinemix.exchange.lookup.BatchLookup`
(borrow, request, poll, release), serve from the disk cache with its ``serve_from_cache`` and count with its
``batch_stats``. The simulator reads the ring only through the trainers' and producers' ports.

What is modelled is time and the disk cache's visibility: a producer's batch takes its pairs divided
by the generation rate; a trainer step takes ``step_s`` plus any wait for its input; the input
pipeline makes ``train.prefetch`` batches ahead, ``prepare_s`` each after the lookup; a producer
commits a cache shard when it holds ``cache.shard_pairs`` pairs or at the end of a batch ``cache.flush_s``
after its last commit; trainers see new shards every ``CACHE_REFRESH_S`` and serve the least used, then
youngest, variation of an image. All trainer ranks of a node step in lockstep, so they are one
consumer of the global batch.

Aimed generation (``generator.aim``, :mod:`onlinemix.exchange.aim`) runs as in training: after each step the
trainers publish the scores of its images through their port, and producers choose by them. What the
simulator cannot know is the model: for ``hard`` and adaptive strength it stands in a fixed, random pair
similarity per image (:func:`stand_in_similarity`), so a simulation shows where generation goes, not what
the model learns from it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from onlinemix.cache.store import Served, Variation, serving_order
from onlinemix.core.config import Config
from onlinemix.core.schedule import EpochSchedule
from onlinemix.exchange.aim import AimPublisher, is_aimed
from onlinemix.exchange.lookup import (
    CACHE_REFRESH_S,
    ORIGINS,
    SYNTHETIC_ORIGINS,
    BatchLookup,
    SecondViews,
    batch_stats,
    reads_disk,
    serve_from_cache,
)
from onlinemix.exchange.ring import WRITE_RETRY_S, PairRing, TrainerPort
from onlinemix.generation.producer import RingWork, producer_port
from onlinemix.generation.worker import IDLE_SLEEP_S, Work


@dataclass(frozen=True)
class Rates:
    """The speeds a simulation runs at, per device."""
    gen_pairs_s: float      # pairs per second one producer makes while it generates
    step_s: float           # seconds of one trainer step over the global batch, waits for input excluded
    prepare_s: float = 0.0  # seconds the input pipeline spends on a batch after its lookup (gather, views)

    def __post_init__(self) -> None:
        if not (self.gen_pairs_s > 0 and self.step_s > 0 and self.prepare_s >= 0):
            raise ValueError(f"rates must be positive (prepare_s may be 0), got {self}")


@dataclass
class EpochResult:
    """One epoch as ``metrics.jsonl``'s epoch row counts it, plus the ring's waste."""
    epoch: int
    fresh: int = 0
    cached: int = 0
    disk: int = 0
    fallback: int = 0
    age_sum: float = 0.0
    reuse_sum: float = 0.0
    stall_s: float = 0.0         # trainer time waiting for its input (data_wait_s)
    wait_s: float = 0.0          # lookup time spent waiting for producers (policy wait)
    epoch_s: float = 0.0
    generated: int = 0           # pairs the producers published during the epoch
    evicted_unserved: int = 0    # of the ring's evictions during the epoch, pairs that never served
    new_variations: int = 0      # variations (image, seed) served for the first time in the run

    @property
    def views(self) -> int:
        return self.fresh + self.cached + self.disk + self.fallback

    def fractions(self) -> dict[str, float]:
        """The share of the views from each origin."""
        return {k: getattr(self, k) / max(1, self.views) for k in ORIGINS}

    @property
    def mean_age(self) -> float:
        synthetic = self.fresh + self.cached + self.disk
        return self.age_sum / synthetic if synthetic else math.nan

    @property
    def mean_reuse(self) -> float:
        synthetic = self.fresh + self.cached + self.disk
        return self.reuse_sum / synthetic if synthetic else math.nan

    def add(self, stats: dict[str, float]) -> None:
        for k in ORIGINS:
            setattr(self, k, getattr(self, k) + int(stats[k]))
        synthetic = sum(stats[k] for k in SYNTHETIC_ORIGINS)
        if synthetic:
            self.age_sum += stats["mean_age"] * synthetic
            self.reuse_sum += stats["mean_reuse"] * synthetic
        self.wait_s += stats["wait_s"]
        self.new_variations += int(stats["new_variations"])


@dataclass
class Simulation:
    """A simulated run: per-epoch results and what the producers made in all."""
    epochs: list[EpochResult]
    wall_s: float
    generated: int
    evicted_unserved: int   # pairs evicted from the ring before they ever served
    unserved_at_end: int    # pairs still in the ring, never served, when training ended
    disk_images: int = 0    # images with a variation the trainers can read from the disk cache at the end
    batches: list[tuple[float, float, int]] = field(default_factory=list)  # producer batches: claimed, published, pairs
    generated_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # each pair's image
    similarity: np.ndarray | None = None  # the stand-in pair similarity of each image (aimed runs)

    @property
    def images_varied(self) -> int:
        """Distinct images the producers made at least one variation of."""
        return len(np.unique(self.generated_ids))

    def total(self) -> EpochResult:
        out = EpochResult(-1)
        for e in self.epochs:
            for name in (*ORIGINS, "age_sum", "reuse_sum", "stall_s", "wait_s", "epoch_s", "generated",
                         "evicted_unserved", "new_variations"):
                setattr(out, name, getattr(out, name) + getattr(e, name))
        return out

    @property
    def stall_fraction(self) -> float:
        return sum(e.stall_s for e in self.epochs) / max(self.wall_s, 1e-12)

    def generated_by(self, t: float) -> float:
        """Pairs generated in the first ``t`` seconds, a batch in progress counted in proportion."""
        return sum(n * min(1.0, max(0.0, (t - start) / max(end - start, 1e-12))) for start, end, n in self.batches)

    @property
    def waste_fraction(self) -> float:
        """Generated pairs the ring evicted before they ever served, of all generated."""
        return self.evicted_unserved / max(1, self.generated)


class _Clock:
    """The virtual clock: callbacks run in time order (ties in the order they were scheduled)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[..., None], *args) -> None:
        heapq.heappush(self._events, (t, self._seq, fn, args))
        self._seq += 1

    def after(self, seconds: float, fn: Callable[..., None], *args) -> None:
        self.at(self.now + seconds, fn, *args)

    def run(self, done: Callable[[], bool]) -> None:
        while self._events and not done():
            self.now, _, fn, args = heapq.heappop(self._events)
            fn(*args)


class DiskCache:
    """The disk cache as the trainers see it: shards committed by each producer's writer, visible after
    the trainers' next index refresh; ``take`` serves the least used, then youngest, variation."""

    def __init__(self, clock: _Clock, images: int, producers: int, shard_pairs: int, flush_s: float,
                 refresh_s: float = CACHE_REFRESH_S) -> None:
        self.clock = clock
        self.shard_pairs = shard_pairs
        self.flush_s = flush_s
        self.refresh_s = refresh_s
        self._pending: list[list[tuple[int, int, float]]] = [[] for _ in range(producers)]
        self._last_flush = [0.0] * producers
        self._committed: list[tuple[int, int, float]] = []
        self._seen = 0
        self._refreshed = 0.0
        self._variations: dict[int, list[list[float]]] = {}  # id -> [[uses, created, epoch], ...]
        self._covered = np.zeros(images, dtype=bool)  # by image id: has a variation the trainers can see

    def warm(self, ids: np.ndarray, variations: int) -> None:
        """Variations 0 .. ``variations`` - 1 of every image, there before training starts (``cache warm``)."""
        for i in ids.tolist():
            self._variations.setdefault(i, []).extend([0, -math.inf, k] for k in range(variations))
        self._covered[ids] = True

    def add(self, producer: int, work: Work) -> None:
        """A producer's batch into its writer (``CacheSink.put``): full shards commit as they fill, a partly
        filled one at the end of the batch when ``flush_s`` has passed since the last commit."""
        pending, now = self._pending[producer], self.clock.now
        for i, e in zip(work.ids.tolist(), work.epochs.tolist(), strict=True):
            pending.append((i, e, now))
            if len(pending) == self.shard_pairs:
                self._commit(producer)
        if now - self._last_flush[producer] >= self.flush_s:
            self._commit(producer)

    def _commit(self, producer: int) -> None:
        self._committed += self._pending[producer]
        self._pending[producer] = []
        self._last_flush[producer] = self.clock.now

    def images(self) -> int:
        """Images with at least one variation committed (visible at the trainers' next refresh)."""
        return len(set(self._variations) | {i for i, _, _ in self._committed})

    def _refresh(self) -> None:
        """The trainers' index refresh: shards committed since the last one become visible."""
        for i, e, created in self._committed[self._seen:]:
            self._variations.setdefault(i, []).append([0, created, e])
            self._covered[i] = True
        self._seen = len(self._committed)
        self._refreshed = self.clock.now

    def take(self, real_ids: list[int]) -> list[Served | None]:
        """:meth:`CacheReader.take <onlinemix.cache.CacheReader.take>` without pixels: one variation of each
        image, the least used, then youngest, or None where the trainers can see none."""
        if self.clock.now - self._refreshed > self.refresh_s:
            self._refresh()
        out: list[Served | None] = []
        for i in real_ids:
            if not self._covered[i]:
                out.append(None)
                continue
            best = min(self._variations[i], key=lambda v: serving_order(*v))
            uses, created, epoch = best
            out.append(Served(None, Variation("", 0, i, 0, int(epoch), created, 0), int(uses)))
            best[0] += 1
        return out


class _Producer:
    """One producer process: claim, generate for pairs / rate seconds, write to the ring (retrying while
    it is full), then the cache; the same loop as ``worker.generate_loop`` with ``RingWork`` and a ring sink."""

    def __init__(self, sim: _Run, index: int) -> None:
        self.sim = sim
        self.index = index
        self.port = producer_port(sim.ring, sim.cfg, sim.schedule.global_batch, sim.producers, index)
        self.work = RingWork(self.port, sim.schedule, sim.cfg)

    def turn(self) -> None:
        if self.work.finished():
            return
        work = self.work.next()
        if work is None:  # polls again once the trainers move (the real loop polls every IDLE_SLEEP_S)
            self.sim.idle.append(self)
            return
        self.sim.clock.after(len(work.ids) / self.sim.rates.gen_pairs_s, self.write, work, self.sim.clock.now, 0)

    def write(self, work: Work, started: float, written: int) -> None:
        sim = self.sim
        if sim.ring.closed:
            return
        pixels = sim.pixels[: len(work.ids) - written]
        placed = self.port.place(pixels, pixels, work.ids[written:], work.positions[written:], work.seeds[written:],
                                 work.epochs[written:], sim.cfg.staleness.max_age)
        written += placed
        if placed:
            sim.trainer.published()
        if written < len(work.ids):
            sim.clock.after(WRITE_RETRY_S, self.write, work, started, written)
            return
        if sim.disk is not None:
            sim.disk.add(self.index, work)
        sim.generated_ids.append(work.ids)
        self.work.done(work, sim.clock.now - started)
        sim.batches.append((started, sim.clock.now, len(work.ids)))
        self.turn()


@dataclass
class _Lookup:
    """The pair lookup of one step in progress, and when its wait for the producers ends."""
    batch: BatchLookup
    step: int
    started: float
    deadline: float = math.inf


class _Trainer:
    """The trainer ranks of a node as one consumer of the global batch, with the input pipeline of
    ``prefetch.Prefetcher``: the lookup of step k+1 starts once step k is queued (at most ``prefetch``
    waiting), or, with ``prefetch`` 0, when the training loop asks for it."""

    def __init__(self, sim: _Run) -> None:
        self.sim = sim
        self.port = TrainerPort(sim.ring, leader=True)
        self.depth = sim.cfg.train.prefetch
        self.next_lookup = 0
        self.lookup: _Lookup | None = None
        self.queue: deque[tuple[int, dict[str, float], SecondViews]] = deque()
        self.blocked: tuple[int, dict[str, float], SecondViews] | None = None  # prepared, waiting for room
        self.aim = AimPublisher(self.port, sim.cfg.generator) if is_aimed(sim.cfg.generator) else None
        self.steps = 0
        self.busy = False
        self.idle_since = 0.0
        self.last_end = 0.0
        self.epoch = EpochResult(0)
        self.epochs: list[EpochResult] = []
        self._ring_counts = (0, 0)
        self.seen: set[tuple[int, int]] = set()  # variations served so far: (image, the epoch it was made for)

    # ------------------------------------------------------------------ input pipeline
    def start(self) -> None:
        self.port.publish_position(0)
        if self.depth > 0:
            self.begin_lookup()
        else:
            self.want()

    def begin_lookup(self) -> None:
        sim = self.sim
        step = self.next_lookup
        self.next_lookup += 1
        gb = sim.schedule.global_batch
        positions = np.arange(step * gb, (step + 1) * gb, dtype=np.int64)
        batch = BatchLookup(self.port, sim.schedule.ids_at(positions), positions,
                            step // sim.schedule.steps_per_epoch, sim.cfg.staleness, verify=False)
        self.lookup = _Lookup(batch, step, sim.clock.now)
        if batch.should_wait():
            batch.request_missing()
            sim.wake_producers()
            self.lookup.deadline = sim.clock.now + sim.cfg.staleness.wait_timeout_s
            sim.clock.at(self.lookup.deadline, self.retry)
            return
        self.finish_lookup()

    def published(self) -> None:
        """Producers published pairs: a waiting lookup tries again now (the real one polls every few ms)."""
        if self.lookup is not None and self.lookup.deadline < math.inf:
            self.retry()

    def retry(self) -> None:
        lookup = self.lookup
        if lookup is None:
            return
        lookup.batch.poll()
        if lookup.batch.complete or self.sim.clock.now >= lookup.deadline:
            self.finish_lookup()

    def finish_lookup(self) -> None:
        sim, lookup = self.sim, self.lookup
        self.lookup = None
        batch = lookup.batch
        served = batch.served()
        batch.release()
        disk = np.zeros(len(batch.ids), dtype=bool)
        if sim.disk is not None and reads_disk(sim.cfg.staleness, online=True):
            disk, taken = serve_from_cache(sim.disk, batch.ids, batch.epoch, batch.result, None)
            served += [(s.variation.real_id, s.variation.epoch) for s in taken]
        new = set(served) - self.seen
        self.seen |= new
        waited = sim.clock.now - lookup.started if lookup.deadline < math.inf else 0.0
        stats = {**batch_stats(batch.result, disk, waited), "new_variations": len(new)}
        self.port.publish_position((lookup.step + 1) * sim.schedule.global_batch)
        sim.wake_producers()
        sim.clock.after(sim.rates.prepare_s, self.prepared, lookup.step, stats,
                        SecondViews.of(batch.ids, batch.result, disk))

    def prepared(self, step: int, stats: dict[str, float], second: SecondViews) -> None:
        if self.depth > 0 and len(self.queue) >= self.depth:
            self.blocked = (step, stats, second)
            return
        self.queue.append((step, stats, second))
        if self.depth > 0 and self.next_lookup < self.sim.total_steps:
            self.begin_lookup()
        self.want()

    # ------------------------------------------------------------------ training loop
    def want(self) -> None:
        """The training loop is free: take the next batch, or (prefetch 0) make it."""
        if self.busy or self.steps == self.sim.total_steps:
            return
        if not self.queue:
            if self.depth == 0 and self.lookup is None and self.next_lookup == self.steps:
                self.begin_lookup()
            return
        _, stats, second = self.queue.popleft()
        self.busy = True
        if self.blocked is not None:
            blocked, self.blocked = self.blocked, None
            self.prepared(*blocked)
        self.sim.clock.after(self.sim.rates.step_s, self.step_done, stats, second,
                             self.sim.clock.now - self.idle_since)

    def step_done(self, stats: dict[str, float], second: SecondViews, data_wait_s: float) -> None:
        sim, now = self.sim, self.sim.clock.now
        self.busy = False
        if self.aim is not None:  # what the trainer publishes after its step (Trainer.publish_aim)
            self.aim.publish(second.ids, second.synthetic, second.uses, second.age, sim.similarity[second.ids])
        self.port.publish_speed(sim.schedule.global_batch, now - self.last_end)
        self.epoch.add(stats)
        self.epoch.stall_s += data_wait_s
        self.steps += 1
        if self.steps % sim.schedule.steps_per_epoch == 0 or self.steps == sim.total_steps:
            self.end_epoch(now)
        self.last_end = self.idle_since = now
        if self.steps == sim.total_steps:
            sim.ring.mark_closed()
            return
        self.want()

    def end_epoch(self, now: float) -> None:
        counts = (self.port.generated, self.port.evicted_unserved)
        self.epoch.generated, self.epoch.evicted_unserved = (c - c0 for c, c0 in zip(counts, self._ring_counts))
        self.epoch.epoch_s = now - sum(e.epoch_s for e in self.epochs)
        self._ring_counts = counts
        self.epochs.append(self.epoch)
        self.epoch = EpochResult(len(self.epochs))


@dataclass
class _Run:
    cfg: Config
    schedule: EpochSchedule
    rates: Rates
    total_steps: int
    producers: int
    clock: _Clock = field(default_factory=_Clock)

    def __post_init__(self) -> None:
        images = len(self.schedule.train_ids)
        self.ring = PairRing.local(self.cfg.ring.slots, images=images, noise=self.cfg.generator.noise)
        self.ring.clock_ns = lambda: round(self.clock.now * 1e9)
        # The model the trainers' scores stand in for: only an aimed run reads it.
        self.similarity = stand_in_similarity(images, self.cfg.train.seed) if is_aimed(self.cfg.generator) else None
        self.generated_ids: list[np.ndarray] = []
        self.pixels = np.zeros((max(self.cfg.generator.batch_size, 1), 3, 1, 1), dtype=np.uint8)
        self.disk: DiskCache | None = None
        self.batches: list[tuple[float, float, int]] = []
        self.idle: list[_Producer] = []
        self.trainer = _Trainer(self)

    def wake_producers(self) -> None:
        """The trainers moved or asked for positions: idle producers poll again at their next turn. Nothing
        else changes what a claim returns, so polling every IDLE_SLEEP_S in between would find nothing."""
        for producer in self.idle:
            self.clock.after(IDLE_SLEEP_S, producer.turn)
        self.idle.clear()


def simulate(cfg: Config, dataset_size: int, rates: Rates, *, producers: int | None = None, trainers: int = 1,
             epochs: int | None = None, warm_variations: int = 0) -> Simulation:
    """Run ``cfg``'s online training of ``dataset_size`` images on a virtual clock.

    ``producers`` defaults to ``cfg.gen_gpus``; ``trainers`` ranks of ``cfg.train.batch_size`` make the
    global batch; ``epochs`` defaults to ``cfg.train.epochs``; ``warm_variations`` > 0 starts from a
    cache that holds that many variations of every image (``python -m onlinemix.cache warm``).
    """
    producers = cfg.gen_gpus if producers is None else producers
    epochs = cfg.train.epochs if epochs is None else epochs
    if producers < 1 or trainers < 1 or epochs < 1:
        raise ValueError(f"a simulation needs at least one producer, trainer and epoch (got {producers}, "
                         f"{trainers}, {epochs})")
    global_batch = trainers * cfg.train.batch_size
    needed = global_batch + producers * cfg.generator.batch_size
    if cfg.ring.slots < needed:
        raise ValueError(f"ring.slots={cfg.ring.slots} cannot hold the global batch ({global_batch}) plus one "
                         f"generator batch per producer: need at least {needed}")
    cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))  # producers claim nothing past the last epoch
    schedule = EpochSchedule(np.arange(dataset_size), global_batch, cfg.train.seed)
    run = _Run(cfg, schedule, rates, epochs * schedule.steps_per_epoch, producers)
    if cfg.cache.enabled:
        run.disk = DiskCache(run.clock, dataset_size, producers, cfg.cache.shard_pairs, cfg.cache.flush_s)
        if warm_variations:
            run.disk.warm(schedule.train_ids, warm_variations)
    for index in range(producers):
        run.clock.at(0.0, _Producer(run, index).turn)
    run.clock.at(0.0, run.trainer.start)
    run.clock.run(lambda: run.trainer.steps == run.total_steps)
    port = run.trainer.port
    disk_images = run.disk.images() if run.disk is not None else 0
    generated_ids = np.concatenate(run.generated_ids) if run.generated_ids else np.zeros(0, dtype=np.int64)
    return Simulation(run.trainer.epochs, run.clock.now, port.generated, port.evicted_unserved, port.unserved,
                      disk_images, run.batches, generated_ids, run.similarity)


def stand_in_similarity(images: int, seed: int) -> np.ndarray:
    """The simulator's model: each image's pair similarity, fixed for the run and uniform in [0, 1]."""
    return np.random.default_rng(seed).random(images).astype(np.float32)
