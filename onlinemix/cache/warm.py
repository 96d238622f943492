"""``cache warm``: generate the variations of every training image into the cache up front.

The paper precomputed its synthetic images before training; this is that step as one command,
with the producers' own generator, seeds and cache format, so a warmed cache holds exactly the
pairs an online run would have generated: variation k of image i has the seed
``variation_seed(generator.seed, i, k)`` and is stored with ``epoch=k``.

Worker processes (one per generator device, ``spawn``) each load the generator, report its
fingerprint, receive their share of the missing (image, variation) pairs from the parent and
write them through their own ``ShardWriter``. Only small integers travel back (pairs done), so
the parent's progress bar costs nothing. A killed warm loses at most each worker's unflushed
shard, and the next warm generates only what is still missing.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data import load_real_images, select_train_ids
from ..generate import make_generator
from ..producer import producer_devices
from ..schedule import variation_seed
from .store import CacheError, CacheReader, cache_key, check_writable, generator_description, writer_for

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
POLL_S = 0.5


@dataclass
class WarmResult:
    key: str
    generated: int
    skipped: int
    seconds: float          # in all, including process start and generator loading
    generate_seconds: float  # from handing out the work to the end
    interrupted: bool


def default_workers() -> int:
    """One worker per visible GPU, or one on the CPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def missing_pairs(reader: CacheReader, train_ids: np.ndarray, base_seed: int, variations: int) -> np.ndarray:
    """(image id, variation k) rows the cache lacks, variation-major: the first variation of every
    image comes before any second one, so a partial warm already covers the whole dataset.
    A pair counts as present when the cache holds that image with that seed (the seed fixes the output)."""
    rows = []
    for k in range(variations):
        for i in train_ids.tolist():
            seed = variation_seed(base_seed, i, k)
            if not any(v.seed == seed for v in reader.variations(i)):
                rows.append((i, k))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------- worker

def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the warm process dies (even by SIGKILL), so an
    orphan never keeps writing shards behind a resumed warm."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the getppid() check between batches does it


def worker_main(index: int, cfg: Config, device: str, parent_pid: int, tasks: mp.Queue, events: mp.Queue,
                stop: mp.Event) -> None:
    """Load the generator, report its identity, then generate the rows the parent sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent stops us via ``stop``
    _die_with_parent()
    if device == "cpu":
        torch.set_num_threads(cfg.generator.cpu_threads)
    try:
        gen = make_generator(cfg.generator, device, cfg.data.resolution)
        events.put(("ready", index, generator_description(gen, cfg.data.dataset)))
        rows = tasks.get()
        if rows is None:
            return
        real = load_real_images(cfg.data).images
        writer = writer_for(cfg, gen)  # the parent's key: every worker's fingerprint agrees
        batch = cfg.generator.batch_size
        for start in range(0, len(rows), batch):
            if stop.is_set() or os.getppid() != parent_pid:
                break
            ids, ks = rows[start:start + batch, 0], rows[start:start + batch, 1]
            seeds = [variation_seed(cfg.generator.seed, int(i), int(k)) for i, k in zip(ids, ks, strict=True)]
            images = real[torch.from_numpy(ids)]
            synthetic = gen.generate(images, seeds).cpu().numpy()
            for j, (i, k) in enumerate(zip(ids, ks, strict=True)):
                writer.add(int(i), seeds[j], int(k), images[j].numpy(), synthetic[j])
            if writer.disabled:
                raise CacheError(f"cache {cfg.cache_root()} stopped accepting pairs (see the warning above)")
            events.put(("done", index, len(ids)))
        if os.getppid() == parent_pid:  # an orphan commits nothing: the resumed warm owns the rest
            writer.close()
        events.put(("finished", index, writer.committed))
    except Exception as e:
        events.put(("failed", index, f"{e.__class__.__name__}: {e}"))
        raise


# ----------------------------------------------------------------------------- parent

class _Workers:
    """The spawned workers and the two queues they talk through."""

    def __init__(self, cfg: Config, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.events, self.stop = ctx.Queue(), ctx.Event()
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=worker_main, name=f"onlinemix-warm-{i}", daemon=True,
                                  args=(i, cfg, device, os.getpid(), self.tasks[i], self.events, self.stop))
                      for i, device in enumerate(producer_devices(n, trainers_on_node=0))]
        for p in self.procs:
            p.start()

    def next_event(self) -> tuple | None:
        """The next worker message; raises when a worker died without saying why."""
        try:
            return self.events.get(timeout=POLL_S)
        except queue.Empty:
            for i, p in enumerate(self.procs):
                if p.exitcode not in (None, 0):
                    raise CacheError(f"warm worker {i} (pid {p.pid}) died with exit code {p.exitcode}") from None
            return None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.stop.set()
        for q in self.tasks:
            q.put(None)  # releases a worker still waiting for its share
            q.cancel_join_thread()  # a dead worker's unread share must not block our exit
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5.0)

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
    while len(descs) < len(workers.procs):
        event = workers.next_event()
        if event is None:
            continue
        if event[0] == "failed":
            raise CacheError(f"warm worker {event[1]} failed to start: {event[2]}")
        descs[event[1]] = event[2]
    fingerprints = {d["fingerprint"] for d in descs.values()}
    if len(fingerprints) > 1:
        raise CacheError(f"the workers' generators differ ({sorted(fingerprints)}): use identical devices")
    return descs[0]


def warm(cfg: Config, variations: int, workers: int) -> WarmResult:
    """Generate the missing variations 0..variations-1 of every training image into ``cfg.cache_root()``."""
    root = cfg.cache_root()
    check_writable(root)
    train_ids = select_train_ids(load_real_images(cfg.data), cfg.data).numpy()  # the images runs train on
    started = time.perf_counter()
    pool = _Workers(cfg, workers)
    key, generated, skipped, interrupted = "(not known yet)", 0, 0, False
    generate_started = None
    try:
        desc = _gather_ready(pool)
        key = cache_key(desc["fingerprint"], cfg.data.dataset)
        todo = missing_pairs(CacheReader(root, key, cfg.data.resolution, verify=False), train_ids,
                             cfg.generator.seed, variations)
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
                elif event[0] == "failed":
                    raise CacheError(f"warm worker {event[1]} failed: {event[2]}")
    except KeyboardInterrupt:
        interrupted = True
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
