"""Persistent on-disk cache of generated synthetic images, served as (real, synthetic) pairs.

Every variation a producer generates costs GPU-seconds, so it is also written here, and later
epochs, later runs and offline training (no generator at all) reuse it. Only the synthetic side is
stored: the real image of a pair is read from the run's image store by id when the pair is served
(``RealImages.images``), so ImageNet-1K costs one copy of its real images, not one per variation.

Layout under the cache root (``cache.dir``), format version 2::

    <key>/generator.json       what made these images: format version, generator identity, dataset, resolution
    <key>/shards/<name>.npy    raw:  uint8 (n, 3, R, R), n synthetic images
                               jpeg: uint8 (total bytes,), n baseline JPEGs back to back
    <key>/index/<name>.json    the shard's commit record: version, format (raw | jpeg), quality and the
                               byte length of each JPEG (jpeg), ids, seeds, epochs, CRC32 of each stored image
                               and, when any is not 0, the noise level each was made with (docs/aim.md)
    quarantine/<key>/...       shards (and records) that ``verify`` found corrupt

``<key>`` is the generator fingerprint (which covers model, dtype, scheduler, steps,
guidance and resolution) joined to a digest of the dataset, whose image ids the images use.
The format is in each shard's record, not in the key: a raw and a JPEG copy of a variation
are the same variation (same generator, image and seed), so switching ``cache.format`` keeps
what is cached usable and ``cache warm`` does not generate it again; readers decode each shard
as its record says, so the two are never confused. The CRC32 covers the stored bytes (the
pixels, or the JPEG), so ``verify`` checks a shard without decoding it.

Version 1 shards held uint8 (n, 2, 3, R, R) pairs, the real image beside its variation;
readers and writers refuse such a key, naming ``python -m onlinemix.cache migrate``, which
rewrites it in place (``migrate.py``).

Crash safety: a shard is written under a temporary name, fsynced and renamed into place;
only then is its index record written the same way. The record is the commit: a reader
only ever looks at shards that have one, so a writer killed at any point leaves either
nothing visible or a complete shard. Several writers (one per producer, on any number of
nodes sharing the filesystem) never touch the same file: shard names carry host, pid and
a sequence number. The index records are small, so "the variations of image i" is a
dictionary lookup after reading them, never a scan of the shards.

Raw uint8 arrays read through ``mmap`` are the default, chosen by measurement (``bench/cache.py``):
the fastest reads and lossless; ``jpeg`` trades a decode per read (nvJPEG when training on a
GPU) and a small loss for several times less disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from isal.isal_zlib import crc32

from onlinemix.core.errors import UserError
from onlinemix.core.files import json_text, unwritable_reason, write_atomically

if TYPE_CHECKING:
    from onlinemix.core.config import Config
    from onlinemix.generation.generator import VariationGenerator

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: shards of (real, synthetic) pairs; 2: the synthetic image only, raw or JPEG
FORMATS = ("raw", "jpeg")
GENERATOR_FILE = "generator.json"
SHARDS, INDEX, QUARANTINE = "shards", "index", "quarantine"
MIGRATE_COMMAND = "python -m onlinemix.cache migrate"
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CacheError(UserError, RuntimeError):
    """The cache cannot be used as configured."""


def cache_key(fingerprint: str, dataset: str) -> str:
    """Directory name of one generator's images for one dataset (ids mean nothing across datasets)."""
    return f"{fingerprint}-{hashlib.sha256(dataset.encode()).hexdigest()[:8]}"


def version_of(description: dict) -> int:
    """The format version a key's ``generator.json`` was written in (version 1 did not record one)."""
    return description.get("version", 1)


def layout_error(root: Path, keys: Sequence[str]) -> CacheError:
    """What to do about keys written in another format version: the one message every refusal gives."""
    return CacheError(
        f"cache {root} holds {len(keys)} key(s) written in an older layout ({', '.join(keys[:3])}"
        f"{' ...' if len(keys) > 3 else ''}: cache format 1, shards of real + synthetic pairs); this version "
        f"stores the synthetic image only and reads the real one from the image store. Convert it in place, "
        f"keeping every variation bit for bit (resumable; stop runs that write this cache first): "
        f"`{MIGRATE_COMMAND} --cache.dir {root}`")


def check_layout(root: Path, keys: Iterable[str] | None = None) -> None:
    """Refuse a cache whose keys (all of them, or ``keys``) are not in the current format version."""
    chosen = {k: version_of(d) for k, d in cache_keys(root).items() if keys is None or k in keys}
    newer = [k for k, v in chosen.items() if v > FORMAT_VERSION]
    if newer:
        raise CacheError(f"cache {root}: key(s) {', '.join(newer)} were written by a newer onlinemix (cache format "
                         f"{chosen[newer[0]]}; this one reads {FORMAT_VERSION}): upgrade onlinemix")
    old = [k for k, v in chosen.items() if v < FORMAT_VERSION]
    if old:
        raise layout_error(root, old)


def check_writable(root: Path) -> None:
    """Fail at start, not mid-run, when the cache directory cannot be written, or holds keys in an
    older layout that new shards must not be mixed into."""
    problem = unwritable_reason(root)
    if problem:
        raise CacheError(f"cache directory {root} is not writable ({problem}); set cache.dir to a "
                         f"writable directory, or cache.enabled=false to train without caching")
    check_layout(root)


# ----------------------------------------------------------------------------- formats

def encode_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (3, R, R) -> baseline JPEG bytes (torchvision, libjpeg's default 4:2:0 chroma)."""
    from torchvision.io import encode_jpeg as encode  # jpeg caches only: raw writers skip the import

    return encode(torch.from_numpy(np.array(image)), quality=quality).numpy()  # a copy: mapped shards are read-only


def decode_images(stored: Sequence[tuple[str, np.ndarray]], resolution: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Stored images (format, bytes) -> uint8 (k, 3, R, R) on the CPU. JPEGs are decoded in one batched
    call on ``device`` (nvJPEG on a GPU: faster than a CPU core by far, and the copy back is cheap)."""
    out = torch.empty((len(stored), 3, resolution, resolution), dtype=torch.uint8)
    jpegs = [j for j, (fmt, _) in enumerate(stored) if fmt == "jpeg"]
    for j, (fmt, data) in enumerate(stored):
        if fmt == "raw":
            out.numpy()[j] = data
    if jpegs:
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded = decode_jpeg([torch.from_numpy(np.array(stored[j][1])) for j in jpegs], mode=ImageReadMode.RGB,
                              device=device)
        out[jpegs] = torch.stack(decoded).cpu()
    return out


# ----------------------------------------------------------------------------- writing

def generator_description(generator: VariationGenerator, dataset: str) -> dict:
    """What ``generator.json`` records of the images' origin; offline runs select keys by its dataset,
    resolution and ``identity.guidance`` (``select_key``)."""
    return {"fingerprint": generator.fingerprint, "identity": generator.identity(), "dataset": dataset}


def writer_for(cfg: Config, generator: VariationGenerator) -> ShardWriter:
    """A writer into ``cfg``'s cache under this generator's and dataset's key, in ``cache.format``: what
    producers and ``cache warm`` workers write through."""
    c = cfg.cache
    return ShardWriter(cfg.cache_root(), cache_key(generator.fingerprint, cfg.data.dataset),
                       generator_description(generator, cfg.data.dataset), generator.resolution, c.shard_pairs,
                       c.flush_s, int(c.max_gb * 1e9), c.format, c.jpeg_quality)


def write_description(key_dir: Path, resolution: int, description: dict) -> None:
    """``generator.json`` in the current format version (atomically: readers select keys by it)."""
    write_atomically(key_dir / GENERATOR_FILE, lambda f: f.write(json_text(
        {**description, "version": FORMAT_VERSION, "resolution": resolution}, indent=2).encode()))


def recorded_noise(level: float) -> float:
    """A noise level as commit records keep it and compare it: thousandths, as the ring's slots hold them."""
    return round(float(level), 3)


def shard_record(name: str, fmt: str, quality: int, resolution: int, rows: Sequence[tuple[int, int, int, int]],
                 lengths: Sequence[int], created: float, noises: Sequence[float] = ()) -> dict:
    """The commit record of a shard of ``rows`` (real id, seed, epoch, CRC32 of the stored image); ``noises``,
    the level each image was made with, is recorded when one is not 0 (an absent list means all 0)."""
    record = {"version": FORMAT_VERSION, "shard": f"{name}.npy", "format": fmt, "pairs": len(rows),
              "resolution": resolution, "created": created, "ids": [r[0] for r in rows],
              "seeds": [r[1] for r in rows], "epochs": [r[2] for r in rows], "checksums": [r[3] for r in rows]}
    if any(noises):
        record["noises"] = [recorded_noise(x) for x in noises]
    if fmt == "jpeg":
        record.update(quality=quality, lengths=list(lengths))
    return record


def commit_shard(key_dir: Path, data: np.ndarray, record: dict) -> None:
    """Write a shard, then its commit record, each atomically; on failure nothing is left visible."""
    shard = key_dir / SHARDS / record["shard"]
    try:
        write_atomically(shard, lambda f: np.save(f, data))
        write_atomically(key_dir / INDEX / f"{shard.stem}.json", lambda f: f.write(json_text(record).encode()))
    except OSError:
        shard.unlink(missing_ok=True)  # committed records only: a shard without one is garbage
        raise


class ShardWriter:
    """Buffers one producer's synthetic images and commits them to the cache a shard at a time.

    A full disk (or quota, or file-size limit) is not fatal: the writer logs one warning,
    removes what it had half-written and stops caching, and training goes on.
    """

    def __init__(self, root: Path, key: str, description: dict, resolution: int, shard_pairs: int,
                 flush_s: float, max_bytes: int = 0, fmt: str = "raw", quality: int = 95) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"cache format must be one of {FORMATS}, not {fmt!r}")
        self.dir = root / key
        self.resolution = resolution
        self.shard_pairs = shard_pairs
        self.flush_s = flush_s
        self.max_bytes = max_bytes
        self.format = fmt
        self.quality = quality
        self.root = root
        self.name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns():x}"
        self.sequence = 0
        self.disabled = False
        self.disabled_reason = ""  # why it stopped accepting pairs, for the trainer's console
        self.committed = 0
        self._pixels = np.empty((shard_pairs if fmt == "raw" else 0, 3, resolution, resolution), dtype=np.uint8)
        self._jpegs: list[np.ndarray] = []
        self._rows: list[tuple[int, int, int, int]] = []  # real id, seed, epoch, CRC32 of the stored bytes
        self._noises: list[float] = []  # the noise level each was made with
        self._last_flush = time.monotonic()
        try:
            (self.dir / SHARDS).mkdir(parents=True, exist_ok=True)
            (self.dir / INDEX).mkdir(parents=True, exist_ok=True)
            if not (self.dir / GENERATOR_FILE).exists():
                write_description(self.dir, resolution, description)
        except OSError as e:
            self._give_up(e)

    def add(self, real_id: int, seed: int, epoch: int, synthetic: np.ndarray, noise: float = 0.0) -> None:
        """Buffer one synthetic image (uint8 (3, R, R)) of real image ``real_id``, made with noise level ``noise``,
        encoded as the cache's format."""
        if self.disabled:
            return
        if self.format == "raw":
            stored = self._pixels[len(self._rows)]
            stored[...] = synthetic
        else:
            stored = encode_jpeg(synthetic, self.quality)
            self._jpegs.append(stored)
        self._append(real_id, seed, epoch, stored, noise)

    def add_jpeg(self, real_id: int, seed: int, epoch: int, data: np.ndarray, noise: float = 0.0) -> None:
        """Buffer an already encoded JPEG as it is (import: a JPEG is never decoded and encoded again)."""
        if self.format != "jpeg":
            raise ValueError(f"add_jpeg needs a jpeg writer; this one writes {self.format}")
        if self.disabled:
            return
        self._jpegs.append(data)
        self._append(real_id, seed, epoch, data, noise)

    def _append(self, real_id: int, seed: int, epoch: int, stored: np.ndarray, noise: float) -> None:
        self._rows.append((real_id, seed, epoch, crc32(stored)))
        self._noises.append(noise)
        if len(self._rows) == self.shard_pairs:
            self.flush()

    def flush_due(self) -> None:
        """Commit a partly filled shard when ``flush_s`` has passed since the last commit: called once a whole
        batch has been added, so that none of its images waits for the next batch (which, when generation
        is slow, comes many seconds later) before the trainers can see it."""
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered images as one shard (nothing to do when the buffer is empty)."""
        self._last_flush = time.monotonic()
        if self.disabled or not self._rows:
            return
        n = len(self._rows)
        data = self._pixels[:n] if self.format == "raw" else np.concatenate(self._jpegs)
        record = shard_record(f"{self.name}-{self.sequence:06d}", self.format, self.quality, self.resolution,
                              self._rows, [len(j) for j in self._jpegs], time.time(), self._noises)
        try:
            commit_shard(self.dir, data, record)
        except OSError as e:
            self._give_up(e)
            return
        self.sequence += 1
        self.committed += n
        self._rows, self._jpegs, self._noises = [], [], []
        if self.max_bytes:
            evict_to_limit(self.root, self.max_bytes)

    def _give_up(self, e: OSError) -> None:
        self.disabled = True
        self._rows, self._jpegs, self._noises = [], [], []
        kind = "the disk is full" if e.errno in DISK_FULL_ERRNOS else "it cannot be written"
        self.disabled_reason = f"cache {self.dir}: {kind} ({e.strerror or e}); new pairs are no longer cached"
        log.warning("%s", self.disabled_reason)

    def close(self) -> None:
        self.flush()


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True, slots=True)
class Variation:
    """One cached synthetic image: where it lies and what made it."""
    shard: str
    row: int
    real_id: int
    seed: int
    epoch: int
    created: float
    checksum: int
    format: str = "raw"
    offset: int = 0  # jpeg: where its bytes start in the shard, and how many
    length: int = 0
    noise: float = 0.0  # the noise level on the image embedding it was made with (docs/aim.md)


@dataclass(frozen=True)
class Served:
    """A variation taken from the cache: its synthetic image (the real one is the image store's)."""
    image: torch.Tensor | None  # uint8 (3, R, R), on the CPU; None from the simulator's model, which has no pixels
    variation: Variation
    uses: int            # times it served before in this run


def read_record(path: Path) -> dict | None:
    """A shard's commit record, or None (with a warning) when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("cache: ignoring unreadable index record %s (%s)", path, e)
        return None


def record_variations(record: dict) -> list[Variation]:
    """The variations a (current version) commit record lists, in shard order."""
    noises = record.get("noises") or [0.0] * len(record["ids"])
    rows = zip(record["ids"], record["seeds"], record["epochs"], record["checksums"], noises)
    if record["format"] == "raw":
        return [Variation(record["shard"], row, *r[:3], record["created"], r[3], noise=r[4])
                for row, r in enumerate(rows)]
    offsets = np.concatenate([[0], np.cumsum(record["lengths"])]).tolist()
    return [Variation(record["shard"], row, *r[:3], record["created"], r[3], "jpeg", offsets[row], length, r[4])
            for row, (r, length) in enumerate(zip(rows, record["lengths"]))]


def stored_image(data: np.ndarray, v: Variation) -> np.ndarray | None:
    """The stored bytes of ``v`` in its mapped shard (pixels, or a JPEG), or None when the shard is too short."""
    if v.format == "raw":
        return data[v.row] if v.row < len(data) else None
    return data[v.offset:v.offset + v.length] if v.offset + v.length <= len(data) else None


class CacheReader:
    """The variations of each image for one cache key, read in place through ``mmap``.

    ``refresh`` picks up shards committed since the last call (producers keep writing
    during a run). Selection prefers the least-used variation, then the youngest.
    JPEG shards are decoded on ``device`` (a trainer's GPU: nvJPEG); images come back on the CPU.
    """

    def __init__(self, root: Path, key: str, resolution: int, verify: bool = True,
                 device: torch.device | str = "cpu") -> None:
        check_layout(root, [key])
        self.dir = root / key
        self.resolution = resolution
        self.verify = verify
        self.device = device
        self._by_id: dict[int, list[Variation]] = {}
        self._seen: set[str] = set()
        self._bad: set[str] = set()
        self._intact: set[str] = set()  # shards whose every pair matched its CRC32 (coverage checked them)
        self._shards: dict[str, list[Variation]] = {}  # per shard, its variations, from its record
        self._maps: dict[str, np.ndarray] = {}
        self._uses: dict[tuple[str, int], int] = {}
        self.refresh()

    def refresh(self) -> int:
        """Read commit records not seen yet; returns how many images they added."""
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
            if version_of(record) != FORMAT_VERSION:
                log.warning("cache: record %s is in cache format %d, not %d; its images are skipped (%s converts "
                            "it)", path, version_of(record), FORMAT_VERSION, MIGRATE_COMMAND)
                continue
            variations = record_variations(record)
            for v in variations:
                self._by_id.setdefault(v.real_id, []).append(v)
            self._shards[record["shard"]] = variations
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
        first candidate is checked, every image against its CRC32, once per shard; shards that hold
        only further variations of covered images are not read at all."""
        return np.array([any(self._shard_intact(v.shard) for v in self.variations(int(i))) for i in ids],
                        dtype=bool)

    def _shard_intact(self, name: str) -> bool:
        if name not in self._intact and name not in self._bad:
            variations = self._shards[name]
            data = self._shard(name, variations[0].format)
            if data is not None:
                stored = [stored_image(data, v) for v in variations]
                short = sum(x is None for x in stored)
                bad = next((v.row for v, x in zip(variations, stored) if x is not None and crc32(x) != v.checksum),
                           None)
                if short:
                    self._skip(name, f"holds {len(variations) - short} images, its record {len(variations)}")
                elif bad is None:
                    self._intact.add(name)
                else:
                    self._skip(name, f"image {bad} fails its checksum")
        return name in self._intact

    def _skip(self, name: str, why: str) -> None:
        """Take a corrupt shard out of service."""
        log.warning("cache: shard %s %s; the shard is skipped (run `python -m onlinemix.cache verify` to "
                    "quarantine it)", name, why)
        self._bad.add(name)

    def _shard(self, name: str, fmt: str) -> np.ndarray | None:
        if name not in self._maps:
            try:
                data = np.load(self.dir / SHARDS / name, mmap_mode="r")
            except (OSError, ValueError) as e:
                self._skip(name, f"is unreadable ({e})")
                return None
            expected = (3, self.resolution, self.resolution) if fmt == "raw" else ()
            if data.dtype != np.uint8 or data.shape[1:] != expected or data.ndim != len(expected) + 1:
                self._skip(name, f"is {data.dtype} {data.shape}, not a {fmt} shard: uint8 "
                                 f"(n, {', '.join(map(str, expected))})")
                return None
            self._maps[name] = data
        return self._maps[name]

    def _stored(self, v: Variation) -> np.ndarray | None:
        """The stored bytes of a variation, CRC-checked; None when its shard is missing or it is corrupt."""
        data = self._shard(v.shard, v.format)
        stored = None if data is None else stored_image(data, v)
        if stored is not None and self.verify and crc32(stored) != v.checksum:
            self._skip(v.shard, f"image {v.row} fails its checksum")
            return None
        return stored

    def read(self, v: Variation) -> torch.Tensor | None:
        """The synthetic image (3, R, R) of one variation, decoded; None when it is missing or corrupt."""
        stored = self._stored(v)
        return None if stored is None else decode_images([(v.format, stored)], self.resolution, self.device)[0]

    def _choose(self, real_id: int) -> tuple[Variation, np.ndarray, int] | None:
        """The least-used, then youngest, readable variation of an image, its stored bytes and prior uses."""
        while True:
            candidates = self.variations(real_id)
            if not candidates:
                return None
            best = min(candidates, key=lambda v: serving_order(self._uses.get((v.shard, v.row), 0), v.created, v.epoch))
            stored = self._stored(best)
            if stored is not None:
                uses = self._uses.get((best.shard, best.row), 0)
                self._uses[(best.shard, best.row)] = uses + 1
                return best, stored, uses

    def restore_uses(self, uses: dict[tuple[str, int], int]) -> None:
        """Continue from these use counts per (shard, row) (a resumed run: what its batches took before)."""
        self._uses = dict(uses)

    def take(self, real_ids: Iterable[int]) -> list[Served | None]:
        """Serve one variation of each image (None where the cache has none readable); the JPEGs among
        them are decoded in one batched call."""
        chosen = [self._choose(int(i)) for i in real_ids]
        found = [c for c in chosen if c is not None]
        images = iter(decode_images([(v.format, stored) for v, stored, _ in found], self.resolution, self.device))
        return [None if c is None else Served(next(images), c[0], c[2]) for c in chosen]


def serving_order(uses: int, created: float, epoch: int) -> tuple[int, float, int]:
    """The sort key of an image's cached variations, first served first: the least used, then the
    youngest (created last, then made for the latest epoch). The simulator serves by the same key."""
    return uses, -created, -epoch


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
