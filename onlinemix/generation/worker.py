"""Generation workers: one process per generator device, turning (image id, seed) work into
(real, synthetic) pairs and handing them to sinks.

The loop and the process lifecycle are the same for online training and for ``cache warm``;
a *job* says where the work comes from and where the pairs go:

- online (:mod:`onlinemix.generation.producer`): positions claimed from the ring ahead of the trainers;
  pairs go to the ring, then to the disk cache;
- warm (:mod:`onlinemix.generation.warm`): rows handed out by the warm command; pairs go to the cache.

A worker ignores Ctrl-C from its first instruction (it reaches the whole process group; the
parent decides when workers stop) and dies with its parent, even a SIGKILLed one (Linux
``PR_SET_PDEATHSIG``; the parent pid is also checked between batches), so an orphan never keeps
writing behind a new run, and it commits nothing: what it held is generated again by whoever
resumes. :class:`WorkerPool` starts workers with ``spawn``, says how dead ones died (with the
worker's own error message, sent through a pipe), restarts them within a budget and stops them.
A worker that fails before it is ready (a generator that cannot load: a missing directory, no
network, xformers asked for and absent) would fail the same way again, so it is not restarted.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from onlinemix.cache import CacheError, ShardWriter
from onlinemix.core.config import Config
from onlinemix.core.devices import make_current
from onlinemix.core.errors import UserError
from onlinemix.data import RealImages, load_real_images
from onlinemix.exchange.ring import ProducerPort
from onlinemix.generation.generator import VariationGenerator, make_generator

log = logging.getLogger(__name__)

IDLE_SLEEP_S = 0.005
PR_SET_PDEATHSIG = 1
MAX_MESSAGE = 1000  # characters of a worker's error message: under PIPE_BUF bytes, one atomic pipe write


class WorkerDied(UserError, RuntimeError):
    """A generation worker exited while it was still needed."""


@dataclass
class Work:
    """What to generate next: real image ids, one seed each, and where each pair belongs."""
    ids: np.ndarray        # int64 (B,)
    seeds: list[int]
    epochs: np.ndarray     # stored with each pair: the epoch it serves (online) or its variation index (warm)
    positions: np.ndarray  # the schedule positions they serve (online); zeros for warm
    noises: np.ndarray | None = None  # float (B,): the noise level of each variation (None: generator.noise)


@dataclass
class Pairs:
    """A generated batch: uint8 (B, 3, R, R) real and synthetic images for ``work``, and the noise level
    each synthetic image was made with."""
    work: Work
    real: np.ndarray
    synthetic: np.ndarray
    noises: np.ndarray


class WorkSource(Protocol):
    def finished(self) -> bool: ...

    def next(self) -> Work | None:
        """The next batch of work, or None when there is none right now (asked again shortly)."""

    def done(self, work: Work, seconds: float) -> None:
        """``work`` went through every sink in ``seconds`` (generation included)."""


class Sink(Protocol):
    def put(self, pairs: Pairs) -> None: ...

    def close(self) -> None:
        """Commit what is buffered; called only while the parent lives."""


class RingSink:
    """Pairs into ring slots (waits while the ring is full)."""

    def __init__(self, port: ProducerPort, max_age: int) -> None:
        self.port = port
        self.max_age = max_age

    def put(self, pairs: Pairs) -> None:
        w = pairs.work
        self.port.write_pairs(pairs.real, pairs.synthetic, w.ids, w.positions, w.seeds, w.epochs, self.max_age,
                              pairs.noises)

    def close(self) -> None:
        pass


class CacheSink:
    """Every pair's synthetic image into the disk cache (the real one is the image store's, read by id).

    A cache that stops accepting pairs (full disk: the writer warns and turns itself off) is an
    error when caching is the job (``required``, warm) and a warning otherwise (online training goes on).
    """

    def __init__(self, writer: ShardWriter, required: bool) -> None:
        self.writer = writer
        self.required = required
        self._reported = False

    def put(self, pairs: Pairs) -> None:
        w = pairs.work
        for i in range(len(w.ids)):
            self.writer.add(int(w.ids[i]), w.seeds[i], int(w.epochs[i]), pairs.synthetic[i], float(pairs.noises[i]))
        self.writer.flush_due()
        if self.writer.disabled and self.required:
            raise CacheError(f"cache {self.writer.dir} stopped accepting pairs (see the warning above)")
        if self.writer.disabled and not self._reported:  # online: the trainer's console and summary say so
            notify(self.writer.disabled_reason)
            self._reported = True

    def close(self) -> None:
        self.writer.close()
        log.info("cached %d pairs in %s", self.writer.committed, self.writer.dir)


class Job(Protocol):
    """What a worker does; picklable, sent to the worker process when it starts."""
    kind: str  # names the workers in messages: "producer", "warm worker"

    def session(self, spec: WorkerSpec, generator: VariationGenerator,
                real: RealImages) -> AbstractContextManager[tuple[WorkSource, list[Sink]]]:
        """Set up (report readiness, open the sinks), yield the work source and sinks, tear down."""


@dataclass
class WorkerSpec:
    """Everything a worker needs; small and picklable (no images, no tensors)."""
    index: int
    cfg: Config
    device: str
    parent_pid: int
    log_path: str | None  # None: warnings to stderr
    job: Job

    @property
    def name(self) -> str:
        return f"{self.job.kind} {self.index}"


def generate_loop(generator: VariationGenerator, images: torch.Tensor, source: WorkSource, sinks: list[Sink],
                  alive: Callable[[], bool]) -> None:
    """Generate until the source has no more work or the parent is gone."""
    while alive() and not source.finished():
        work = source.next()
        if work is None:
            time.sleep(IDLE_SLEEP_S)
            continue
        started = time.perf_counter()
        real = images[torch.from_numpy(work.ids)]
        noises = np.full(len(work.ids), generator.noise, dtype=np.float32) if work.noises is None else work.noises
        pairs = Pairs(work, real.numpy(), generator.generate(real, work.seeds, noises).cpu().numpy(), noises)
        for sink in sinks:
            sink.put(pairs)
        source.done(work, time.perf_counter() - started)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when its parent dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the parent-pid check between batches does it


def _setup_logging(spec: WorkerSpec) -> None:
    if spec.log_path is None:
        return
    handler = logging.FileHandler(spec.log_path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {spec.job.kind.replace(' ', '-')}-{spec.index} "
                                           "%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def error_message(error: BaseException) -> str:
    """An exception's own message on one line (diffusers and the hub write several), or its class name."""
    return " ".join(str(error).split())[:MAX_MESSAGE] or error.__class__.__name__


_notices: Connection | None = None  # this worker process's channel for :func:`notify` (set by worker_main)


def notify(message: str) -> None:
    """Tell the pool's process something its user must see though the worker goes on (a cache that stopped
    accepting pairs): the pool logs it on the trainer's console and keeps it for the run summary."""
    if _notices is not None:
        _notices.send(message)


def worker_main(spec: WorkerSpec, failures: Connection, notices: Connection | None = None) -> None:
    """Entry point of a worker process (started with SIGINT and SIGTERM ignored: :meth:`WorkerPool._start`). An
    error is logged with its traceback (the worker's log, or stderr) and sent to the pool as
    (ready, message); the process then exits with status 1, without a second traceback."""
    global _notices
    _notices = notices
    _die_with_parent()
    make_current(spec.device)  # first: nothing may open a context on cuda:0, a trainer's GPU
    _setup_logging(spec)
    # tqdm's default lock is a multiprocessing semaphore, for bars shared between processes, which
    # workers never draw (diffusers creates a disabled bar per call); a worker killed by SIGKILL would
    # leave it registered with the resource tracker, which then warns of a leaked semaphore at exit.
    tqdm.set_lock(threading.RLock())
    cfg = spec.cfg
    if spec.device == "cpu":
        torch.set_num_threads(cfg.generator.cpu_threads)
    elif cfg.producer.memory_fraction:  # a GPU shared with a trainer: keep to a share of it
        torch.cuda.set_per_process_memory_fraction(cfg.producer.memory_fraction, torch.device(spec.device))
    alive = lambda: os.getppid() == spec.parent_pid  # noqa: E731
    ready = False
    try:
        real = load_real_images(cfg.data, cfg.store_root())
        generator = make_generator(cfg.generator, spec.device, real.size)
        log.info("pid %d started on %s; fingerprint %s; attention %s", os.getpid(), spec.device,
                 generator.fingerprint, generator.attention)
        with spec.job.session(spec, generator, real) as (source, sinks):
            ready = True
            try:
                generate_loop(generator, real.images, source, sinks, alive)
            finally:
                if alive():  # an orphan commits nothing: whoever resumes owns the rest
                    for sink in sinks:
                        sink.close()
    except Exception as e:
        log.exception("%s failed", spec.name)
        failures.send((ready, error_message(e)))
        sys.exit(1)


class WorkerPool:
    """Starts, watches, restarts and stops the worker processes of one node."""

    def __init__(self, specs: list[WorkerSpec], max_restarts: int) -> None:
        self.specs = specs
        self.max_restarts = max_restarts
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        # Two pipes per worker (kept across its restarts): why it failed, and what it reports while it goes on.
        self._failures = [self._ctx.Pipe(duplex=False) for _ in specs]
        self._notices = [self._ctx.Pipe(duplex=False) for _ in specs]
        self.notices: list[str] = []  # every worker notice so far, "<worker>: <message>"
        self.procs = [self._process(i) for i in range(len(specs))]

    def _process(self, i: int) -> mp.process.BaseProcess:
        spec = self.specs[i]
        return self._ctx.Process(target=worker_main, args=(spec, self._failures[i][1], self._notices[i][1]),
                                 daemon=True, name=f"onlinemix-{spec.job.kind.replace(' ', '-')}-{spec.index}")

    @staticmethod
    def _start(p: mp.process.BaseProcess) -> None:
        """Start a worker with SIGINT and SIGTERM ignored, which it inherits from its first instruction.
        Ctrl-C and a cluster's preemption signal reach the whole process group; they are the parent's to
        act on (a trainer finishes its step and writes a checkpoint meanwhile, and needs its producers
        for that step), and the parent stops its workers itself. A worker still dies with its parent."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            p.start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start(self) -> None:
        for p in self.procs:
            self._start(p)

    @staticmethod
    def exit_cause(p: mp.process.BaseProcess) -> str:
        return f"killed by signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exit code {p.exitcode}"

    def _failure(self, i: int) -> tuple[bool, str] | None:
        """(was it ready, its error message) sent by worker i before it died, if it sent one."""
        reader, failure = self._failures[i][0], None
        while reader.poll():  # the latest; a restarted worker's earlier failure was reported already
            failure = reader.recv()
        return failure

    def check(self) -> None:
        """Log the workers' notices; restart workers that died (exited other than cleanly) while the
        restart budget lasts; then raise :class:`WorkerDied`, naming the worker, how it died and its own
        error message. A worker that failed before it was ready is not restarted: it would fail the same way."""
        for spec, (reader, _) in zip(self.specs, self._notices, strict=True):
            while reader.poll():
                self.notices.append(f"{spec.name}: {reader.recv()}")
                log.warning("%s", self.notices[-1])
        for i, p in enumerate(self.procs):
            if p.exitcode in (None, 0):
                continue
            spec, failure = self.specs[i], self._failure(i)
            log_hint = f"; see its log {Path(spec.log_path).name}" if spec.log_path else ""
            if failure is not None and not failure[0]:
                where = f"traceback in {Path(spec.log_path).name}" if spec.log_path else "traceback above"
                raise WorkerDied(f"{spec.name} (pid {p.pid}) failed before it was ready, so it is not restarted "
                                 f"({where}): {failure[1]}")
            self._restart(i, f"{spec.name} (pid {p.pid}) died: {self.exit_cause(p)}{log_hint}" + (
                f"; {failure[1]}" if failure is not None else ""))

    def _restart(self, i: int, message: str) -> None:
        """Start worker i again, within the restart budget; once it is spent, raise :class:`WorkerDied`
        with ``message`` (what happened to the worker)."""
        if self.restarts >= self.max_restarts:
            budget = f" (restart budget producer.max_restarts={self.max_restarts} spent)" if self.max_restarts else ""
            raise WorkerDied(message + budget)
        self.restarts += 1
        self.procs[i] = self._process(i)
        self._start(self.procs[i])
        log.warning("%s; restarted it as pid %d (restart %d of %d)", message, self.procs[i].pid,
                    self.restarts, self.max_restarts)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for workers to finish (the caller has told them to), then terminate and kill the rest."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            if p.pid is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():  # it ignores SIGTERM (see _start)
                p.kill()
                p.join()
