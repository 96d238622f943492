"""A node's side of training: its place in the launch, its generation and the pairs its trainers read.

Each node has a ring and producers of its own. Its launching rank creates the ring and starts the producers
(:func:`start_generation`), handing them the trainers' own schedule; every rank then reads pairs through a
:class:`~onlinemix.exchange.lookup.PairSource` (:func:`open_pairs`): online from the ring, then the disk
cache the producers write; offline from the cache alone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from onlinemix.cache import CacheError, CacheReader, cache_key, cache_keys, select_key
from onlinemix.core.config import Config, ConfigError, GeneratorConfig
from onlinemix.core.devices import NodeLaunch, shared_with_trainers
from onlinemix.core.schedule import EpochSchedule
from onlinemix.data import RealImages, select_train_ids
from onlinemix.exchange.lookup import PairSource
from onlinemix.exchange.ring import PairRing, TrainerPort, remove_stale_segments
from onlinemix.generation.producer import ProducerPool
from onlinemix.training.prefetch import check_running

log = logging.getLogger("onlinemix")

PRODUCER_START_TIMEOUT_S = 600.0


@dataclass
class NodePairs:
    """Where a trainer rank's pairs come from: the lookup, and online the ring's trainer end and (on the node's
    launching rank) the producers."""
    source: PairSource | None = None  # None: plain SSL, or nothing left to train
    port: TrainerPort | None = None
    pool: ProducerPool | None = None


def node_schedule(accelerator: Accelerator, real: RealImages, cfg: Config) -> EpochSchedule:
    """The order this node's trainers see the training images in (``data.real_fraction`` of them), and the
    object its producers follow: they get this one (:func:`start_generation`), not a copy built to match."""
    return EpochSchedule(select_train_ids(real, cfg.data).numpy(), cfg.train.batch_size * accelerator.num_processes,
                         cfg.train.seed, *node_of(accelerator))


def local_world_size(accelerator: Accelerator) -> int:
    """Trainer processes on this node (torchrun and accelerate launch export LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def node_of(accelerator: Accelerator) -> tuple[int, int]:
    """(this node's rank, the number of nodes): torchrun's GROUP_RANK (accelerate launch runs it too),
    else from the ranks, which launchers number node by node."""
    per_node = local_world_size(accelerator)
    return int(os.environ.get("GROUP_RANK", accelerator.process_index // per_node)), accelerator.num_processes // per_node


def start_generation(cfg: Config, accelerator: Accelerator, run_dir: Path, schedule: EpochSchedule, devices: list[str],
                     resolution: int, images: int, stack: ExitStack) -> tuple[TrainerPort, ProducerPool | None]:
    """Each node's launching rank creates the node's ring (pairs at ``resolution``, an image table of ``images``
    rows) and starts its producers on ``devices``; the
    other local ranks attach by the name it writes to ``.ring-node<N>`` in the (node-local or shared)
    run directory. Every rank gets its end of the ring; the launching rank leads (publishes position and
    speed)."""
    node, nodes = schedule.node, schedule.nodes
    name_file = run_dir / f".ring-node{node}"
    pool = None
    if accelerator.is_local_main_process:
        for stale in remove_stale_segments():
            log.warning("removed shared-memory segment %s left by a dead run", stale)
        ring = PairRing.create(cfg.ring.slots, resolution, images, cfg.generator.noise)
        stack.callback(ring.close)
        name_file.write_text(ring.name)
        pool = ProducerPool(cfg, ring, devices, schedule, run_dir)
        stack.callback(pool.stop)
        pool.start()
        shared = shared_with_trainers(NodeLaunch.detect(local_world_size(accelerator)), devices)
        if shared:
            log.warning("producers share %s with trainer ranks: they take turns on it (producer.memory_fraction "
                        "caps a producer's memory)", ", ".join(shared))
        log.info("node %d of %d: ring %s: %d slots, %.1f MiB; %d producer(s) on %s", node, nodes, ring.name,
                 ring.slots, ring.shm.size / 2**20, len(devices), ", ".join(devices))
    accelerator.wait_for_everyone()
    if not accelerator.is_local_main_process:
        ring = PairRing.attach(name_file.read_text())
        stack.callback(ring.close)
    return TrainerPort(ring, leader=accelerator.is_local_main_process), pool


def waiting_check(stop: threading.Event, pool: ProducerPool | None) -> None:
    """What a trainer checks while it waits for missing pairs: the input pipeline closing and, on the
    main thread only, dead producers (restarted there: a process started from the pipeline's thread
    would be killed with that thread, as producers die with their parent, PR_SET_PDEATHSIG)."""
    check_running(stop)
    if pool is not None and threading.current_thread() is threading.main_thread():
        pool.check()


def wait_for_producers(port: TrainerPort, pool: ProducerPool | None, n: int) -> None:
    """Block until every producer has loaded its generator, so the first batches are not all fallbacks."""
    log.info("waiting for %d producer(s) to load the generator", n)
    started = time.monotonic()
    while port.ready_producers < n:
        if pool is not None:
            pool.check()
        if time.monotonic() - started > PRODUCER_START_TIMEOUT_S:
            raise TimeoutError(f"producers not ready after {PRODUCER_START_TIMEOUT_S:.0f}s; see producer-*.log")
        time.sleep(0.05)
    log.info("producers ready after %.1fs", time.monotonic() - started)


def open_online_cache(cfg: Config, port: TrainerPort, resolution: int, device: torch.device) -> CacheReader:
    """The disk cache the producers of this run write (their generator's key), read for older variations
    (JPEG shards decoded on the trainer's ``device``)."""
    return CacheReader(cfg.cache_root(), cache_key(port.fingerprint, cfg.data.dataset), resolution,
                       cfg.cache.verify_reads, device)


def adopt_cached_generator(cfg: Config, identity: dict, where: Path) -> None:
    """An offline run trains from variations some generator made: its settings go into ``cfg`` (and so
    config.yaml), not the configured ones. A generator.model set other than the default and different
    from the cache's is refused: those variations are not what the user asked for."""
    made_by = identity.get("model")
    if made_by is None or made_by == cfg.generator.model:
        return
    if cfg.generator.model != GeneratorConfig().model:
        raise ConfigError(f"offline: generator.model={cfg.generator.model}, but the cached pairs for this dataset, "
                          f"resolution and guidance ({where}) were made by {made_by}; warm the cache with "
                          f"{cfg.generator.model} first, or leave generator.model out to train from them")
    log.warning("offline: the cached pairs in %s were made by generator.model=%s, not the configured %s: training "
                "from them, and the run's config records %s", where, made_by, cfg.generator.model, made_by)
    for name in ("model", "revision", "tiny_vae", "scheduler", "steps"):
        if identity.get(name) not in (None, ""):
            setattr(cfg.generator, name, identity[name])
    if identity.get("stub_seed") is not None:
        cfg.generator.stub_seed = identity["stub_seed"]


def open_offline_cache(cfg: Config, train_ids: np.ndarray, resolution: int, device: torch.device) -> CacheReader:
    """The cache an offline run trains from (pairs at the stored size ``resolution``); refuses to start
    below ``cache.min_coverage`` of images with a variation that reads back intact (``CacheReader.coverage``)."""
    root = cfg.cache_root()
    key = select_key(root, cfg.data.dataset, resolution, cfg.generator.guidance, cfg.cache.fingerprint)
    adopt_cached_generator(cfg, cache_keys(root)[key].get("identity", {}), root / key)
    reader = CacheReader(root, key, resolution, cfg.cache.verify_reads, device)
    covered = reader.coverage(train_ids)
    missing = int((~covered).sum())
    if covered.mean() < cfg.cache.min_coverage:
        raise CacheError(f"offline: {missing} of {len(train_ids)} training images have no intact cached variation "
                         f"in {root / key} (coverage {100 * covered.mean():.1f}% < cache.min_coverage "
                         f"{100 * cfg.cache.min_coverage:.1f}%); warm the cache first with `python -m "
                         "onlinemix.cache warm` (after `cache verify` when shards were reported corrupt above, so "
                         "that warm regenerates their pairs), or lower cache.min_coverage")
    log.info("offline: training from %s: %d pairs, %d of %d training images covered (%d will get a real "
             "second view)", root / key, len(reader), len(train_ids) - missing, len(train_ids), missing)
    return reader


def open_pairs(cfg: Config, accelerator: Accelerator, run_dir: Path, schedule: EpochSchedule, real: RealImages,
               devices: list[str], stop: threading.Event, stack: ExitStack) -> NodePairs:
    """The pairs of a run that trains synthetic views: online, the node's ring (created and its producers
    started here, stopped by ``stack``) with the disk cache they write; offline, the cache alone. ``stop``
    ends the lookup's waits when the input pipeline closes."""
    if cfg.offline:
        cache = open_offline_cache(cfg, schedule.train_ids, real.size, accelerator.device)
        return NodePairs(PairSource(None, cfg.staleness, real.images, cfg.ring.verify_checksums,
                                    lambda: check_running(stop), cache))
    port, pool = start_generation(cfg, accelerator, run_dir, schedule, devices, real.size, len(real.images), stack)
    wait_for_producers(port, pool, len(devices))
    cache = open_online_cache(cfg, port, real.size, accelerator.device) if cfg.cache.enabled else None
    return NodePairs(PairSource(port, cfg.staleness, real.images, cfg.ring.verify_checksums,
                                lambda: waiting_check(stop, pool), cache), port, pool)
