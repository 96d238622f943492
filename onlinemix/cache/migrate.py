"""``cache migrate``: convert a cache written in the old layout (format 1, shards of (real, synthetic)
pairs) to the current one (the synthetic image only), in place.

Per old shard ``<name>``: its pairs are checked against the record's CRC32s, their synthetic halves are
committed as shard ``<name>-v2`` (in ``cache.format``; ``raw`` keeps them bit for bit) with a record
that keeps the ids, seeds, epochs and creation time, and only then are the old record and shard
removed. ``generator.json`` is rewritten last, and until then readers refuse the key, so they never see
a half-migrated one. A killed migrate resumes where it stopped: an old shard whose ``-v2`` record is
already committed is only removed. An old shard that fails its checksums is moved to
``quarantine/<key>/`` (as ``verify`` does), never deleted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from isal.isal_zlib import crc32
from tqdm.auto import tqdm

from onlinemix.cache.maintenance import quarantine, scan_key
from onlinemix.cache.store import (
    FORMAT_VERSION,
    GENERATOR_FILE,
    INDEX,
    CacheError,
    cache_keys,
    commit_shard,
    encode_jpeg,
    read_record,
    shard_record,
    version_of,
    write_description,
)

log = logging.getLogger(__name__)

SUFFIX = "-v2"


def old_pairs(record: dict | None, shard: Path) -> np.ndarray | str:
    """The uint8 (n, 2, 3, R, R) pairs of an old shard, checked against its record; or why they are unusable."""
    if record is None or any(f not in record for f in ("pairs", "resolution", "ids", "seeds", "epochs", "checksums")):
        return "unreadable or incomplete commit record"
    n, r = record["pairs"], record["resolution"]
    try:
        pairs = np.load(shard, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"unreadable shard ({e})"
    if pairs.dtype != np.uint8 or pairs.shape != (n, 2, 3, r, r):
        return f"shard is {pairs.dtype} {pairs.shape}, the record says uint8 {(n, 2, 3, r, r)}"
    bad = [row for row in range(n) if crc32(pairs[row]) != record["checksums"][row]]
    return f"{len(bad)} of {n} pairs fail their CRC32 (first: row {bad[0]})" if bad else pairs


def convert(key_dir: Path, record: dict, pairs: np.ndarray, fmt: str, quality: int, name: str) -> None:
    """Commit the synthetic halves of ``pairs`` as shard ``name`` in ``fmt``, keeping the record's rows."""
    synthetic = pairs[:, 1]
    stored = [np.ascontiguousarray(s) if fmt == "raw" else encode_jpeg(s, quality) for s in synthetic]
    rows = [(i, seed, epoch, crc32(s)) for i, seed, epoch, s in
            zip(record["ids"], record["seeds"], record["epochs"], stored, strict=True)]
    data = np.ascontiguousarray(synthetic) if fmt == "raw" else np.concatenate(stored)
    commit_shard(key_dir, data, shard_record(name, fmt, quality, record["resolution"], rows,
                                             [len(s) for s in stored], record["created"]))


def migrate_key(root: Path, key: str, fmt: str, quality: int) -> dict:
    """Convert every old-layout shard of a key, then mark the key current; returns what was done."""
    key_dir = root / key
    files = scan_key(root, key)
    migrated, resumed, corrupt = 0, 0, {}
    for record_path, shard in tqdm(files.committed, desc=f"migrate {key[:16]}", unit="shard", dynamic_ncols=True,
                                   leave=False):
        record = read_record(record_path)
        if record is not None and version_of(record) >= FORMAT_VERSION:
            continue
        name = shard.stem + SUFFIX
        if (key_dir / INDEX / f"{name}.json").exists():
            resumed += 1  # converted and committed before an interruption: only the removal is left
        else:
            pairs = old_pairs(record, shard)
            if isinstance(pairs, str):
                corrupt[shard.name] = pairs
                quarantine(root, key, record_path, shard)
                continue
            convert(key_dir, record, pairs, fmt, quality, name)
            migrated += 1
        record_path.unlink()  # the record first: no reader ever looks up a pair whose shard is gone
        shard.unlink()
    description = json.loads((key_dir / GENERATOR_FILE).read_text())
    if version_of(description) < FORMAT_VERSION:
        old = {k: v for k, v in description.items() if k != "format"}  # format 1 kept its version there
        write_description(key_dir, old.pop("resolution"), old)
    return {"key": key, "migrated": migrated, "resumed": resumed, "corrupt": corrupt}


def migrate(root: Path, fmt: str, quality: int) -> list[dict]:
    """Convert every key of the cache that holds old-layout shards or an old ``generator.json``."""
    if not root.is_dir():
        raise CacheError(f"cache {root}: no such directory (the cache directory is cache.dir, by default "
                         "<output_dir>/cache)")
    keys = cache_keys(root)
    if not keys:
        raise CacheError(f"cache {root} holds no keys")
    newer = [k for k, d in keys.items() if version_of(d) > FORMAT_VERSION]
    if newer:
        raise CacheError(f"cache {root}: key(s) {', '.join(newer)} were written by a newer onlinemix; upgrade it")
    return [migrate_key(root, key, fmt, quality) for key in keys]


def format_migrate(res: dict) -> str:
    lines = [f"{res['key']}: {res['migrated']} shard(s) converted"
             + (f", {res['resumed']} finished from an interrupted migrate" if res["resumed"] else "")]
    for name, reason in res["corrupt"].items():
        lines.append(f"  QUARANTINED {name}: {reason}")
    return "\n".join(lines)
