"""Persistent on-disk cache of generated (real, synthetic) pairs.

Every pair a producer generates costs GPU-seconds, so it is also written here, and later
epochs, later runs and offline training (no generator at all) reuse it.

Layout under the cache root (``cache.dir``)::

    <key>/generator.json       what made these pairs: generator identity, dataset, resolution
    <key>/shards/<name>.npy    uint8 (n, 2, 3, R, R): n pairs, real then synthetic
    <key>/index/<name>.json    the shard's commit record: ids, seeds, epochs, CRC32 of each pair
    quarantine/<key>/...       shards (and records) that ``verify`` found corrupt

``<key>`` is the generator fingerprint (which covers model, dtype, scheduler, steps,
guidance and resolution) joined to a digest of the dataset, whose image ids the pairs use.

Crash safety: a shard is written under a temporary name, fsynced and renamed into place;
only then is its index record written the same way. The record is the commit: a reader
only ever looks at shards that have one, so a writer killed at any point leaves either
nothing visible or a complete shard. Several writers (one per producer, on any number of
nodes sharing the filesystem) never touch the same file: shard names carry host, pid and
a sequence number. The index records are small, so "the variations of image i" is a
dictionary lookup after reading them, never a scan of the shards.

Raw uint8 arrays read through ``mmap`` were chosen over compressed formats by measurement
(``bench/cache.py``); the cache is lossless.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
from isal.isal_zlib import crc32

from ..files import json_text, unwritable_reason, write_atomically

if TYPE_CHECKING:
    from ..config import Config
    from ..generate import VariationGenerator

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GENERATOR_FILE = "generator.json"
SHARDS, INDEX, QUARANTINE = "shards", "index", "quarantine"
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CacheError(RuntimeError):
    """The cache cannot be used as configured."""


def cache_key(fingerprint: str, dataset: str) -> str:
    """Directory name of one generator's pairs for one dataset (ids mean nothing across datasets)."""
    return f"{fingerprint}-{hashlib.sha256(dataset.encode()).hexdigest()[:8]}"


def check_writable(root: Path) -> None:
    """Fail at start, not mid-run, when the cache directory cannot be written."""
    problem = unwritable_reason(root)
    if problem:
        raise CacheError(f"cache directory {root} is not writable ({problem}); set cache.dir to a "
                         f"writable directory, or cache.enabled=false to train without caching")


# ----------------------------------------------------------------------------- writing

def generator_description(generator: VariationGenerator, dataset: str) -> dict:
    """What ``generator.json`` records of the pairs' origin; offline runs select keys by its dataset,
    resolution and ``identity.guidance`` (``select_key``)."""
    return {"fingerprint": generator.fingerprint, "identity": generator.identity(), "dataset": dataset}


def writer_for(cfg: Config, generator: VariationGenerator) -> ShardWriter:
    """A writer into ``cfg``'s cache under this generator's and dataset's key: what producers and
    ``cache warm`` workers write through."""
    c = cfg.cache
    return ShardWriter(cfg.cache_root(), cache_key(generator.fingerprint, cfg.data.dataset),
                       generator_description(generator, cfg.data.dataset), generator.resolution, c.shard_pairs,
                       c.flush_s, int(c.max_gb * 1e9))


class ShardWriter:
    """Buffers one producer's pairs and commits them to the cache a shard at a time.

    A full disk (or quota, or file-size limit) is not fatal: the writer logs one warning,
    removes what it had half-written and stops caching, and training goes on.
    """

    def __init__(self, root: Path, key: str, description: dict, resolution: int, shard_pairs: int,
                 flush_s: float, max_bytes: int = 0) -> None:
        self.dir = root / key
        self.resolution = resolution
        self.shard_pairs = shard_pairs
        self.flush_s = flush_s
        self.max_bytes = max_bytes
        self.root = root
        self.name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns():x}"
        self.sequence = 0
        self.disabled = False
        self.committed = 0
        self._pairs = np.empty((shard_pairs, 2, 3, resolution, resolution), dtype=np.uint8)
        self._rows: list[tuple[int, int, int, int]] = []  # real id, seed, epoch, CRC32
        self._last_flush = time.monotonic()
        try:
            (self.dir / SHARDS).mkdir(parents=True, exist_ok=True)
            (self.dir / INDEX).mkdir(parents=True, exist_ok=True)
            meta = self.dir / GENERATOR_FILE
            if not meta.exists():
                write_atomically(meta, lambda f: f.write(json_text(
                    {"format": FORMAT_VERSION, "resolution": resolution, **description}, indent=2).encode()))
        except OSError as e:
            self._give_up(e)

    def add(self, real_id: int, seed: int, epoch: int, real: np.ndarray, synthetic: np.ndarray,
            checksum: int | None = None) -> None:
        """Buffer one pair. ``checksum`` is its CRC32 when the caller has it already (the ring's
        ``write`` returns the same value for the same pair), else it is computed here."""
        if self.disabled:
            return
        row = len(self._rows)
        self._pairs[row, 0] = real
        self._pairs[row, 1] = synthetic
        self._rows.append((real_id, seed, epoch, crc32(self._pairs[row]) if checksum is None else checksum))
        if len(self._rows) == self.shard_pairs or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered pairs as one shard (nothing to do when the buffer is empty)."""
        self._last_flush = time.monotonic()
        if self.disabled or not self._rows:
            return
        n = len(self._rows)
        pairs = self._pairs[:n]
        name = f"{self.name}-{self.sequence:06d}"
        shard = self.dir / SHARDS / f"{name}.npy"
        record = {"shard": shard.name, "pairs": n, "resolution": self.resolution, "created": time.time(),
                  "ids": [r[0] for r in self._rows], "seeds": [r[1] for r in self._rows],
                  "epochs": [r[2] for r in self._rows], "checksums": [r[3] for r in self._rows]}
        try:
            write_atomically(shard, lambda f: np.save(f, pairs))
            write_atomically(self.dir / INDEX / f"{name}.json", lambda f: f.write(json_text(record).encode()))
        except OSError as e:
            shard.unlink(missing_ok=True)  # committed records only: a shard without one is garbage
            self._give_up(e)
            return
        self.sequence += 1
        self.committed += n
        self._rows = []
        if self.max_bytes:
            evict_to_limit(self.root, self.max_bytes)

    def _give_up(self, e: OSError) -> None:
        self.disabled = True
        self._rows = []
        kind = "the disk is full" if e.errno in DISK_FULL_ERRNOS else "it cannot be written"
        log.warning("cache %s: %s (%s); training goes on without caching new pairs", self.dir, kind,
                    e.strerror or e)

    def close(self) -> None:
        self.flush()


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Variation:
    """One cached pair: where it lies and what made it."""
    shard: str
    row: int
    real_id: int
    seed: int
    epoch: int
    created: float
    checksum: int


def read_record(path: Path) -> dict | None:
    """A shard's commit record, or None (with a warning) when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("cache: ignoring unreadable index record %s (%s)", path, e)
        return None


class CacheReader:
    """The variations of each image for one cache key, read in place through ``mmap``.

    ``refresh`` picks up shards committed since the last call (producers keep writing
    during a run). Selection prefers the least-used variation, then the youngest.
    """

    def __init__(self, root: Path, key: str, resolution: int, verify: bool = True) -> None:
        self.dir = root / key
        self.resolution = resolution
        self.verify = verify
        self._by_id: dict[int, list[Variation]] = {}
        self._seen: set[str] = set()
        self._bad: set[str] = set()
        self._intact: set[str] = set()  # shards whose every pair matched its CRC32 (coverage checked them)
        self._checksums: dict[str, list[int]] = {}  # per shard, from its record
        self._maps: dict[str, np.ndarray] = {}
        self._uses: dict[tuple[str, int], int] = {}
        self.refresh()

    def refresh(self) -> int:
        """Read commit records not seen yet; returns how many pairs they added."""
        added = 0
        index = self.dir / INDEX
        if not index.is_dir():
            return 0
        for path in sorted(index.glob("*.json")):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            record = read_record(path)
            if record is None or record.get("resolution") != self.resolution:
                continue
            for row, (real_id, seed, epoch, checksum) in enumerate(zip(
                    record["ids"], record["seeds"], record["epochs"], record["checksums"])):
                self._by_id.setdefault(real_id, []).append(
                    Variation(record["shard"], row, real_id, seed, epoch, record["created"], checksum))
            self._checksums[record["shard"]] = record["checksums"]
            added += record["pairs"]
        return added

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_id.values())

    def variations(self, real_id: int) -> list[Variation]:
        return [v for v in self._by_id.get(real_id, ()) if v.shard not in self._bad]

    def coverage(self, ids: Iterable[int]) -> np.ndarray:
        """For each id: does the cache hold a variation of it in a shard that reads back intact?

        A commit record alone is not enough: a corrupt shard would count, then serve nothing (a pair
        that fails its CRC32 takes its whole shard out of service). So the shard of each image's
        first candidate is checked, every pair against its CRC32, once per shard; shards that hold
        only further variations of covered images are not read at all."""
        return np.array([any(self._shard_intact(v.shard) for v in self.variations(int(i))) for i in ids],
                        dtype=bool)

    def _shard_intact(self, name: str) -> bool:
        if name not in self._intact and name not in self._bad:
            pairs, checksums = self._shard(name), self._checksums[name]
            if pairs is not None and len(pairs) < len(checksums):
                self._skip(name, f"holds {len(pairs)} pairs, its record {len(checksums)}")
            elif pairs is not None:
                bad = next((row for row, c in enumerate(checksums) if crc32(pairs[row]) != c), None)
                if bad is None:
                    self._intact.add(name)
                else:
                    self._skip(name, f"pair {bad} fails its checksum")
        return name in self._intact

    def _skip(self, name: str, why: str) -> None:
        """Take a corrupt shard out of service."""
        log.warning("cache: shard %s %s; the shard is skipped (run `python -m onlinemix.cache verify` to "
                    "quarantine it)", name, why)
        self._bad.add(name)

    def _shard(self, name: str) -> np.ndarray | None:
        if name not in self._maps:
            try:
                # Copy-on-write: writable for torch.from_numpy, while the file itself is never modified.
                pairs = np.load(self.dir / SHARDS / name, mmap_mode="c")
            except (OSError, ValueError) as e:
                self._skip(name, f"is unreadable ({e})")
                return None
            r = self.resolution
            if pairs.ndim != 5 or pairs.shape[1:] != (2, 3, r, r):
                self._skip(name, f"has shape {pairs.shape}, not (n, 2, 3, {r}, {r})")
                return None
            self._maps[name] = pairs
        return self._maps[name]

    def read(self, v: Variation) -> np.ndarray | None:
        """The (2, 3, R, R) pair, read in place; None when its shard is missing or the pair is corrupt."""
        pairs = self._shard(v.shard)
        if pairs is None or v.row >= len(pairs):
            return None
        pair = pairs[v.row]
        if self.verify and crc32(pair) != v.checksum:
            self._skip(v.shard, f"pair {v.row} fails its checksum")
            return None
        return pair

    def take(self, real_id: int) -> tuple[np.ndarray, Variation, int] | None:
        """Serve the least-used, then youngest, readable variation of an image: (pair, variation,
        times it served before in this process), or None when the cache has none."""
        while True:
            candidates = self.variations(real_id)
            if not candidates:
                return None
            best = min(candidates, key=lambda v: (self._uses.get((v.shard, v.row), 0), -v.created, -v.epoch))
            pair = self.read(best)
            if pair is not None:
                uses = self._uses.get((best.shard, best.row), 0)
                self._uses[(best.shard, best.row)] = uses + 1
                return pair, best, uses


def cache_keys(root: Path) -> dict[str, dict]:
    """Every key under the root with its generator description."""
    out = {}
    if not root.is_dir():
        return out
    for meta in sorted(root.glob(f"*/{GENERATOR_FILE}")):
        try:
            out[meta.parent.name] = json.loads(meta.read_text())
        except (OSError, ValueError):
            log.warning("cache: ignoring unreadable %s", meta)
    return out


def select_key(root: Path, dataset: str, resolution: int, guidance: float, fingerprint: str = "") -> str:
    """The cache key an offline run trains from: the one made for this dataset, resolution and
    guidance (and fingerprint, when given). Several candidates are an error that lists them."""
    keys = cache_keys(root)
    matches = [k for k, d in keys.items()
               if d.get("dataset") == dataset and d.get("resolution") == resolution
               and d.get("identity", {}).get("guidance") == guidance
               and (not fingerprint or k.startswith(fingerprint))]
    if len(matches) == 1:
        return matches[0]
    wanted = f"dataset {dataset!r}, resolution {resolution}, guidance {guidance}" + (
        f", fingerprint {fingerprint}" if fingerprint else "")
    if not matches:
        have = "; ".join(f"{k}: dataset {d.get('dataset')!r}, resolution {d.get('resolution')}, guidance "
                         f"{d.get('identity', {}).get('guidance')}" for k, d in keys.items()) or "nothing"
        raise CacheError(f"cache {root} has no pairs for {wanted} (it holds {have}); warm it first with "
                         f"`python -m onlinemix.cache warm`")
    raise CacheError(f"cache {root} has several generators for {wanted}: {', '.join(matches)}; choose one "
                     f"with cache.fingerprint")


# ----------------------------------------------------------------------------- size limit

def shard_files(root: Path) -> list[tuple[Path, Path]]:
    """(index record, shard) of every committed shard under the root."""
    return [(rec, rec.parent.parent / SHARDS / (rec.stem + ".npy")) for rec in root.glob(f"*/{INDEX}/*.json")]


def evict_to_limit(root: Path, max_bytes: int) -> int:
    """Delete the oldest shards until the cache fits in ``max_bytes``; returns how many went.
    The commit record goes first, so no reader ever looks up a pair whose shard is gone."""
    shards = []
    for rec, shard in shard_files(root):
        try:
            shards.append((shard.stat().st_mtime, rec, shard, shard.stat().st_size + rec.stat().st_size))
        except FileNotFoundError:
            continue  # another writer evicted it meanwhile
    total = sum(s[3] for s in shards)
    removed = 0
    for _, rec, shard, size in sorted(shards, key=lambda s: s[0]):
        if total <= max_bytes:
            break
        rec.unlink(missing_ok=True)
        shard.unlink(missing_ok=True)
        total -= size
        removed += 1
    if removed:
        log.info("cache: evicted the %d oldest shard(s) to stay under %.2f GB", removed, max_bytes / 1e9)
    return removed
