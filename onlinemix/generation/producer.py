"""Producers: generation workers that follow the trainers through the ring.

A producer claims the next positions of the trainers' schedule where the trainers will be
when its batch is ready (:class:`~onlinemix.exchange.ring.ProducerPort`), skips images that already
have an unused view waiting, generates the rest with per-image seeds and publishes the pairs
into ring slots, then into the disk cache. :class:`ProducerPool` runs one per generator device and
watches each one's progress counter in the ring, so a producer that is alive but stuck (stopped,
a hung GPU call) is reported, counted and restarted instead of silently costing every step its
full ``staleness.wait_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onlinemix.cache import writer_for
from onlinemix.core.config import Config
from onlinemix.core.files import write_json
from onlinemix.core.schedule import EpochSchedule, variation_seed
from onlinemix.data import RealImages
from onlinemix.exchange.aim import choose_positions
from onlinemix.exchange.ring import PairRing, ProducerPort
from onlinemix.generation.generator import VariationGenerator
from onlinemix.generation.worker import CacheSink, RingSink, Sink, Work, WorkerPool, WorkerSpec

log = logging.getLogger(__name__)


class RingWork:
    """Online work: positions claimed from the ring ahead of the trainers, minus the images
    that already have an unused view waiting for them and the positions past the end of training.

    Aimed (``generator.aim`` other than none), a claim spans the positions the trainers pass while its pairs
    are made (or that the budget gives them), and they go to its highest-scoring images
    (:mod:`onlinemix.exchange.aim`).
    Under a budget (``producer.max_pairs_per_epoch``) work waits until the trainers' progress allows it.
    Each image's variation is made with the noise level the trainers set for it."""

    def __init__(self, port: ProducerPort, schedule: EpochSchedule, cfg: Config) -> None:
        self.port = port
        self.schedule = schedule
        self.batch_size = cfg.generator.batch_size
        self.max_age = cfg.staleness.max_age
        self.base_seed = cfg.generator.seed
        self.aimed = cfg.generator.aim != "none"
        self.adaptive = cfg.generator.strength == "adaptive"
        self.budget_per_epoch = cfg.producer.max_pairs_per_epoch
        self.end = cfg.train.epochs * schedule.positions_per_epoch  # no trainer asks for a position past it

    def finished(self) -> bool:
        return self.port.closed

    def budget_allowed(self) -> int:
        """Pairs the budget allows in all by now: its share of the trainers' progress, plus one batch to start on."""
        done = self.port.trainer_position / self.schedule.positions_per_epoch
        return int(self.budget_per_epoch * done) + self.batch_size

    def positions_per_pair(self) -> float:
        """The positions the trainers pass for each pair the producers can make: in the time a pair takes, or
        under a budget the positions it gives a pair, whichever is more. An aimed claim spans that many per pair."""
        per_pair = self.port.passed_per_batch() / self.batch_size
        if self.budget_per_epoch:
            per_pair = max(per_pair, self.schedule.positions_per_epoch / self.budget_per_epoch)
        return per_pair

    def next(self) -> Work | None:
        while not self.port.closed:
            n = self.batch_size
            if self.budget_per_epoch:
                n = min(n, self.budget_allowed() - self.port.budget_used)
                if n <= 0:
                    return None
            claim = self.port.claim(n, self.positions_per_pair() if self.aimed else 0.0)
            positions = claim.positions[claim.positions < self.end]
            if len(positions) == 0:
                return None
            ids, epochs = self.schedule.ids_at(positions), self.schedule.epoch_of(positions)
            todo = np.flatnonzero(~self.port.has_unused_view(ids, positions, epochs, self.max_age))
            if self.aimed:
                todo = choose_positions(todo, self.port.scores(ids[todo]), claim.most)
            if self.budget_per_epoch:
                todo = todo[:self.port.take_budget(len(todo), self.budget_allowed())]
            if len(todo):
                ids, epochs = ids[todo], epochs[todo]
                seeds = [variation_seed(self.base_seed, int(i), int(e)) for i, e in zip(ids, epochs, strict=True)]
                return Work(ids, seeds, epochs, positions[todo], self.port.noise_levels(ids) if self.adaptive else None)
        return None

    def done(self, work: Work, seconds: float) -> None:
        self.port.count_busy(seconds)
        # The lead is planned for full batches; a batch thinned out by the skip counts as one.
        self.port.observe_batch(seconds * self.batch_size / len(work.ids))


def producer_port(ring: PairRing, cfg: Config, node_batch: int, producers: int, index: int) -> ProducerPort:
    """The port of the node's producer ``index``: its claims and the unserved pairs waiting fit in the slots
    that its trainers' batch (their slice of each global batch) and the other producers' batches leave."""
    others = (producers - 1) * cfg.generator.batch_size
    return ProducerPort(ring, capacity=max(cfg.generator.batch_size, ring.slots - node_batch - others),
                        lead_factor=cfg.producer.lead_factor, index=index, trainer_batch=node_batch,
                        producers=producers)


@dataclass
class OnlineJob:
    """What a producer needs to follow its node's trainers: the ring's name and the trainers' own
    schedule (the same object, pickled: the ids, their order and the node's slice of each global batch).
    Its producers are numbered from ``first_index`` (unique across nodes, for their names and files)."""
    ring_name: str
    schedule: EpochSchedule
    first_index: int = 0
    kind: str = "producer"

    @contextmanager
    def session(self, spec: WorkerSpec, generator: VariationGenerator,
                real: RealImages) -> Iterator[tuple[RingWork, list[Sink]]]:
        cfg, schedule = spec.cfg, self.schedule
        ring = PairRing.attach(self.ring_name)
        try:
            port = producer_port(ring, cfg, schedule.node_batch, cfg.producers, spec.index - self.first_index)
            if spec.log_path is not None:
                write_json(Path(spec.log_path).with_suffix(".json"),
                           {"pid": os.getpid(), "device": spec.device, "model": cfg.generator.model,
                            "dtype": str(generator.dtype), "attention": generator.attention,
                            "attention_reason": generator.attention_reason, "fingerprint": generator.fingerprint})
            sinks: list[Sink] = [RingSink(port, cfg.staleness.max_age)]
            if cfg.cache.enabled:
                sinks.append(CacheSink(writer_for(cfg, generator), required=False))
            port.report_ready(generator.fingerprint)
            yield RingWork(port, schedule, cfg), sinks
        finally:
            ring.close()


@dataclass
class _Watch:
    """What the pool last saw of one producer's progress counter, and since when."""
    pid: int | None
    progress: int
    since: float
    turning: bool = False  # its loop has turned since it started (loading the generator is not watched)
    warned: bool = False


class ProducerPool(WorkerPool):
    """The producers of one node: one per generator device, restarted within ``producer.max_restarts``.

    Node n's producers are numbered from n x (producers per node), so their names and their files
    (``producer-<number>.log`` and ``.json``) are unique across the nodes of a run, also on a shared
    run directory. A live producer whose progress counter has not moved for ``producer.stuck_s`` is
    reported once and counted in ``stalls``; still stuck after twice that, it is killed and restarted."""

    def __init__(self, cfg: Config, ring: PairRing, devices: list[str], schedule: EpochSchedule,
                 log_dir: Path) -> None:
        job = OnlineJob(ring.name, schedule, first_index=schedule.node * len(devices))
        specs = [WorkerSpec(job.first_index + i, cfg, device, os.getpid(),
                            str(log_dir / f"producer-{job.first_index + i}.log"), job)
                 for i, device in enumerate(devices)]
        super().__init__(specs, cfg.producer.max_restarts)
        self.ring = ring
        self.stuck_s = cfg.producer.stuck_s
        self.stalls = 0  # stuck producers reported
        self._watch = [_Watch(None, 0, 0.0) for _ in specs]

    def check(self) -> None:
        """Restart dead producers (:meth:`WorkerPool.check`), then watch the live ones' progress."""
        super().check()
        if self.stuck_s:
            for i in range(len(self.procs)):
                self._watch_progress(i)

    def _watch_progress(self, i: int) -> None:
        p, seen = self.procs[i], self._watch[i]
        progress, now = self.ring.producer_progress(i), time.monotonic()
        if p.pid != seen.pid or progress != seen.progress:  # a new process, or its loop turned
            self._watch[i] = _Watch(p.pid, progress, now, turning=p.pid == seen.pid)
            return
        stuck = now - seen.since
        if not seen.turning or stuck < self.stuck_s:
            return
        name = f"{self.specs[i].name} (pid {p.pid})"
        if not seen.warned:
            seen.warned = True
            self.stalls += 1
            log.warning("%s has made no progress for %.0fs (producer.stuck_s=%g; stopped, or a hung GPU call?); "
                        "training goes on under the staleness policy, and it is restarted if still stuck after "
                        "%.0fs", name, stuck, self.stuck_s, 2 * self.stuck_s)
        elif stuck >= 2 * self.stuck_s:
            p.kill()
            p.join(10.0)
            self._restart(i, f"{name} made no progress for {stuck:.0f}s (producer.stuck_s={self.stuck_s:g}); killed it")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the ring to producers (they finish their batch and exit), then stop the processes."""
        self.ring.mark_closed()
        super().stop(timeout_s)
