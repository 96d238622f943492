"""Producer processes: generate variations for the images the trainers will ask for next.

Each producer claims the next positions of the trainers' schedule from the ring, skips
images that already have an unused view waiting, generates the rest with per-image
seeds and publishes (real, synthetic) pairs into ring slots. The pool starts producers
with ``spawn``, watches them, and stops them on every exit path of the trainer.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import ShardWriter, writer_for
from .config import Config
from .data import load_real_images, select_train_ids
from .generate import VariationGenerator, make_generator
from .ring import PairRing
from .schedule import EpochSchedule, variation_seed

log = logging.getLogger(__name__)

IDLE_SLEEP_S = 0.005


class ProducerDied(RuntimeError):
    """A producer process exited while the trainers still needed it."""


@dataclass
class ProducerSpec:
    """Everything a producer needs; small and picklable (no images, no tensors)."""
    index: int
    cfg: Config
    ring_name: str
    device: str
    global_batch: int
    parent_pid: int
    log_path: str


def producer_devices(gen_gpus: int, trainers_on_node: int) -> list[str]:
    """Producer i takes the first GPU after the trainers' GPUs; without GPUs all run on the CPU."""
    if not torch.cuda.is_available():
        return ["cpu"] * gen_gpus
    available = torch.cuda.device_count()
    needed = trainers_on_node + gen_gpus
    if needed > available:
        raise RuntimeError(f"{trainers_on_node} trainer(s) + gen_gpus={gen_gpus} producer(s) need {needed} GPUs "
                           f"but {available} are visible; lower gen_gpus or the number of trainer processes")
    return [f"cuda:{trainers_on_node + i}" for i in range(gen_gpus)]


def _setup_producer_logging(path: str, index: int) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s producer-{index} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def producer_main(spec: ProducerSpec) -> None:
    """Entry point of a producer process."""
    # Ctrl-C reaches the whole process group; the trainer decides when producers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _setup_producer_logging(spec.log_path, spec.index)
    cfg = spec.cfg
    if spec.device == "cpu":
        torch.set_num_threads(cfg.generator.cpu_threads)
    ring = PairRing.attach(spec.ring_name)
    try:
        run_producer(spec, ring)
    except Exception:
        log.exception("producer %d failed", spec.index)
        raise
    finally:
        ring.close()


def run_producer(spec: ProducerSpec, ring: PairRing) -> None:
    cfg = spec.cfg
    real = load_real_images(cfg.data)
    schedule = EpochSchedule(select_train_ids(real, cfg.data).numpy(), spec.global_batch, cfg.train.seed)
    generator = make_generator(cfg.generator, spec.device, cfg.data.resolution)
    log.info("pid %d started on %s; fingerprint %s; attention %s", os.getpid(), spec.device,
             generator.fingerprint, generator.attention)
    Path(spec.log_path).with_suffix(".json").write_text(json.dumps(
        {"pid": os.getpid(), "device": spec.device, "model": cfg.generator.model, "dtype": str(generator.dtype),
         "attention": generator.attention, "attention_reason": generator.attention_reason,
         "fingerprint": generator.fingerprint}, indent=2))
    cache = writer_for(cfg, generator) if cfg.cache.enabled else None
    ring.add("ready_producers", 1)
    try:
        _produce(spec, ring, real, schedule, generator, cache)
    finally:
        if cache is not None:
            cache.close()
            log.info("cached %d pairs in %s", cache.committed, cache.dir)


def _produce(spec: ProducerSpec, ring: PairRing, real, schedule: EpochSchedule, generator: VariationGenerator,
             cache: ShardWriter | None) -> None:
    cfg = spec.cfg
    lookahead = max(cfg.generator.batch_size, ring.slots - spec.global_batch)
    batch_s = LeadEstimator()
    while not ring.closed and os.getppid() == spec.parent_pid:
        lead = batch_s.lead_positions(ring.get("trainer_rate_milli") / 1000.0, cfg.producer.lead_factor)
        positions = ring.claim_positions(cfg.generator.batch_size, lookahead, lead)
        if len(positions) == 0:
            time.sleep(IDLE_SLEEP_S)
            continue
        ids = schedule.ids_at(positions)
        epochs = schedule.epoch_of(positions)
        todo = ~ring.has_unused_view(ids, positions, epochs, cfg.staleness.max_age)
        if not todo.any():
            continue
        positions, ids, epochs = positions[todo], ids[todo], epochs[todo]
        seeds = [variation_seed(cfg.generator.seed, int(i), int(e)) for i, e in zip(ids, epochs)]
        start = time.perf_counter_ns()
        real_batch = real.images[torch.from_numpy(ids)]
        synthetic = generator.generate(real_batch, seeds).cpu().numpy()
        ring.add("generate_ns", time.perf_counter_ns() - start)
        checksums = _write_pairs(ring, real_batch.numpy(), synthetic, ids, positions, seeds, epochs,
                                 cfg.staleness.max_age)
        if cache is not None:
            for i in range(len(ids)):
                cache.add(int(ids[i]), seeds[i], int(epochs[i]), real_batch[i].numpy(), synthetic[i],
                          checksums[i] if i < len(checksums) else None)
        batch_s.observe((time.perf_counter_ns() - start) / 1e9 * cfg.generator.batch_size / len(ids))


class LeadEstimator:
    """How far ahead of the trainers to claim: they move ``rate`` positions per second and a
    claimed batch takes ``batch_s`` seconds to reach the ring, so claim where they will be by
    then, times a safety ``factor`` (0 = claim right at the trainers)."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.batch_s: float | None = None

    def observe(self, seconds: float) -> None:
        self.batch_s = seconds if self.batch_s is None else (1 - self.smoothing) * self.batch_s + self.smoothing * seconds

    def lead_positions(self, trainer_rate: float, factor: float) -> int:
        return int(trainer_rate * (self.batch_s or 0.0) * factor)


def _write_pairs(ring: PairRing, real: np.ndarray, synthetic: np.ndarray, ids: np.ndarray,
                 positions: np.ndarray, seeds: list[int], epochs: np.ndarray, max_age: int) -> list[int]:
    """Write pairs as slots become available; waits (bounded by the ring closing) when it is full.
    Returns the CRC32 of each pair written (fewer than asked when the ring closed first)."""
    i = 0
    written: list[int] = []
    while i < len(ids):
        if ring.closed:
            return written
        slots = ring.reserve(len(ids) - i, int(epochs[i]), max_age)
        if not slots:
            time.sleep(IDLE_SLEEP_S)
            continue
        batch = slice(i, i + len(slots))
        checksums = [ring.write(slot, real[j], synthetic[j]) for slot, j in zip(slots, range(i, i + len(slots)))]
        ring.publish_many(slots, real_ids=ids[batch], positions=positions[batch], seeds=seeds[batch],
                          birth_epochs=epochs[batch], checksums=checksums)
        written += checksums
        i += len(slots)
    return written


class ProducerPool:
    """Starts, watches, restarts and stops the producer processes of one node."""

    def __init__(self, cfg: Config, ring: PairRing, devices: list[str], global_batch: int, log_dir: Path) -> None:
        self.ring = ring
        self.max_restarts = cfg.producer.max_restarts
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self.specs = [ProducerSpec(i, cfg, ring.name, device, global_batch, os.getpid(), str(log_dir / f"producer-{i}.log"))
                      for i, device in enumerate(devices)]
        self.procs = [self._process(spec) for spec in self.specs]

    def _process(self, spec: ProducerSpec) -> mp.process.BaseProcess:
        return self._ctx.Process(target=producer_main, args=(spec,), name=f"onlinemix-producer-{spec.index}", daemon=True)

    def start(self) -> None:
        for p in self.procs:
            p.start()

    @staticmethod
    def exit_cause(p: mp.process.BaseProcess) -> str:
        return f"killed by signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exit code {p.exitcode}"

    def check(self) -> None:
        """Restart dead producers while the restart budget lasts; then raise, naming the producer and its cause."""
        for i, p in enumerate(self.procs):
            if p.exitcode is None:
                continue
            message = f"producer {i} (pid {p.pid}) died: {self.exit_cause(p)}; see its log producer-{i}.log"
            if self.restarts >= self.max_restarts:
                raise ProducerDied(message + f" (restart budget producer.max_restarts={self.max_restarts} spent)")
            self.restarts += 1
            self.procs[i] = self._process(self.specs[i])
            self.procs[i].start()
            log.warning("%s; restarted it as pid %d (restart %d of %d)", message, self.procs[i].pid,
                        self.restarts, self.max_restarts)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask producers to finish, then terminate and kill the ones that do not."""
        self.ring.set("closed", 1)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            if p.pid is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
