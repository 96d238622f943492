"""``cache info`` and ``cache verify``: what a cache holds, and whether its bytes are still right.

Both read the layout ``store`` writes (``<key>/shards/*.npy`` + ``<key>/index/*.json``). Only
``verify`` ever moves anything, and only into ``quarantine/<key>/``: good data is never deleted. A key in
the old layout is listed by ``info`` and refused by ``verify``, both naming ``cache migrate``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from isal.isal_zlib import crc32
from tqdm.auto import tqdm

from onlinemix.cache.store import (
    FORMAT_VERSION,
    GENERATOR_FILE,
    INDEX,
    MIGRATE_COMMAND,
    QUARANTINE,
    SHARDS,
    cache_keys,
    check_layout,
    read_record,
    record_variations,
    stored_image,
    version_of,
)

RECORD_FIELDS = ("version", "shard", "format", "pairs", "resolution", "ids", "seeds", "epochs", "checksums")
OLD_RECORD = f"a commit record of cache format 1 (real + synthetic pairs): `{MIGRATE_COMMAND}` converts it"


@dataclass
class KeyFiles:
    """The files of one cache key, sorted by what they mean for a reader."""
    key: str
    committed: list[tuple[Path, Path]] = field(default_factory=list)  # (record, shard): what readers see
    orphans: list[Path] = field(default_factory=list)     # shards without a record: a writer died before committing
    dangling: list[Path] = field(default_factory=list)    # records whose shard is gone
    temporary: list[Path] = field(default_factory=list)   # ``.<name>.tmp``: being written, or left by a killed writer

    @property
    def leftovers(self) -> int:
        return len(self.orphans) + len(self.dangling) + len(self.temporary)


def scan_key(root: Path, key: str) -> KeyFiles:
    files = KeyFiles(key)
    shards_dir, index_dir = root / key / SHARDS, root / key / INDEX
    shards = {p.stem: p for p in shards_dir.glob("*.npy")} if shards_dir.is_dir() else {}
    records = {p.stem: p for p in index_dir.glob("*.json")} if index_dir.is_dir() else {}
    for name in sorted(records):
        if name in shards:
            files.committed.append((records[name], shards[name]))
        else:
            files.dangling.append(records[name])
    files.orphans = [shards[name] for name in sorted(shards) if name not in records]
    files.temporary = sorted(p for d in (shards_dir, index_dir, root / key) if d.is_dir() for p in d.glob(".*.tmp"))
    return files


def committed_records(root: Path, key: str) -> Iterator[tuple[dict, Path]]:
    """(record, shard path) of every committed shard of a key whose record is readable."""
    for record_path, shard in scan_key(root, key).committed:
        record = read_record(record_path)
        if record is not None:
            yield record, shard


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- info

def key_info(root: Path, key: str, desc: dict, train_ids: np.ndarray | None) -> dict:
    """Counts for one key, from its commit records; with ``train_ids`` also the fraction of the
    training images that have a variation (images without one then show in the histogram as 0)."""
    files = scan_key(root, key)
    per_id: Counter[int] = Counter()
    formats: Counter[str] = Counter()
    for record, _ in committed_records(root, key):
        per_id.update(record["ids"])
        formats[record.get("format", "pairs")] += record["pairs"]
    ids = list(per_id) if train_ids is None else [int(i) for i in train_ids]
    identity = desc.get("identity", {})
    info = {"key": key, "model": identity.get("model"), "guidance": identity.get("guidance"),
            "resolution": desc.get("resolution"), "dataset": desc.get("dataset"),
            "fingerprint": desc.get("fingerprint"), "version": version_of(desc), "formats": dict(sorted(formats.items())),
            "pairs": sum(per_id.values()), "images": len(per_id),
            "variations_histogram": dict(sorted(Counter(per_id[i] for i in ids).items())),
            "shards": len(files.committed), "bytes": disk_bytes(root / key),
            "orphan_shards": [p.name for p in files.orphans], "dangling_records": [p.name for p in files.dangling],
            "temporary_files": [p.name for p in files.temporary]}
    if train_ids is not None:
        info["train_images"] = len(ids)
        info["coverage"] = sum(1 for i in ids if per_id[i]) / len(ids) if ids else 0.0
    return info


def format_info(info: dict) -> str:
    hist = ", ".join(f"{k}: {v}" for k, v in info["variations_histogram"].items()) or "empty"
    lines = [f"{info['key']}",
             f"  generator   {info['model']}, guidance {info['guidance']}, resolution {info['resolution']}, "
             f"dataset {info['dataset']!r}",
             f"  pairs       {info['pairs']} in {info['shards']} shard(s) ("
             + ", ".join(f"{fmt} {n}" for fmt, n in info["formats"].items()) + f"), {info['bytes'] / 1e6:.1f} MB on disk",
             f"  images      {info['images']} with at least one variation"
             + (f" = {100 * info['coverage']:.1f}% of the {info['train_images']} training images"
                if "coverage" in info else ""),
             f"  variations per image (variations: images)  {hist}"]
    if info["version"] < FORMAT_VERSION:
        lines.append(f"  layout      cache format {info['version']} (real + synthetic pairs): readers refuse it until "
                     f"`{MIGRATE_COMMAND}` converts it")
    leftovers = [(info["orphan_shards"], "shard(s) without a commit record (invisible to readers; "
                                         "`verify --quarantine-orphans` moves them)"),
                 (info["dangling_records"], "commit record(s) whose shard is missing (`verify` quarantines them)"),
                 (info["temporary_files"], "temporary file(s) (a writer at work, or one that was killed)")]
    for names, what in leftovers:
        if names:
            lines.append(f"  uncommitted {len(names)} {what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    return "\n".join(lines)


def quarantined(root: Path) -> dict[str, int]:
    """Files already in quarantine, per key."""
    base = root / QUARANTINE
    return {d.name: sum(1 for p in d.rglob("*") if p.is_file()) for d in sorted(base.iterdir()) if d.is_dir()} \
        if base.is_dir() else {}


# ----------------------------------------------------------------------------- verify

def check_shard(record_path: Path, shard: Path) -> str | None:
    """Why a committed shard is unusable, or None when every stored image matches its record's CRC32."""
    record = read_record(record_path)
    if record is not None and version_of(record) < FORMAT_VERSION:
        return OLD_RECORD
    if record is None or any(f not in record for f in RECORD_FIELDS) or (
            record["format"] == "jpeg" and "lengths" not in record):
        return "unreadable or incomplete commit record"
    r, n, fmt = record["resolution"], record["pairs"], record["format"]
    lists = ("ids", "seeds", "epochs", "checksums") + (("lengths",) if fmt == "jpeg" else ())
    if not all(len(record[f]) == n for f in lists):
        return "record lists do not have one entry per image"
    try:
        data = np.load(shard, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"unreadable shard ({e})"
    expected = (n, 3, r, r) if fmt == "raw" else (sum(record["lengths"]),)
    if data.dtype != np.uint8 or data.shape != expected:
        return f"{fmt} shard is {data.dtype} {data.shape}, the record says uint8 {expected}"
    bad = [v.row for v in record_variations(record) if crc32(stored_image(data, v)) != v.checksum]
    if bad:
        return f"{len(bad)} of {n} {fmt} images fail their CRC32 (first: row {bad[0]})"
    return None


def quarantine(root: Path, key: str, *paths: Path) -> None:
    """Move files to ``quarantine/<key>/<shards|index>/``; the record goes first, so no new reader
    ever looks up a pair in a shard that is being moved away."""
    for path in sorted(paths, key=lambda p: p.parent.name != INDEX):
        dest = root / QUARANTINE / key / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)


def verify_key(root: Path, key: str, quarantine_orphans: bool) -> dict:
    """Check every committed shard of a key; quarantine the corrupt ones (and orphans when asked). Records
    of the old layout are listed, not moved: ``migrate`` converts them."""
    check_layout(root, [key])
    files = scan_key(root, key)
    corrupt, old = {}, []
    for record, shard in tqdm(files.committed, desc=f"verify {key[:16]}", unit="shard", dynamic_ncols=True,
                              leave=False):
        reason = check_shard(record, shard)
        if reason == OLD_RECORD:
            old.append(shard.name)
        elif reason:
            corrupt[shard.name] = reason
            quarantine(root, key, record, shard)
    for record in files.dangling:
        corrupt[record.name] = "commit record without its shard"
        quarantine(root, key, record)
    if quarantine_orphans and files.orphans:
        quarantine(root, key, *files.orphans)
    return {"key": key, "shards": len(files.committed), "corrupt": corrupt, "old_layout": old,
            "orphans": [p.name for p in files.orphans], "orphans_quarantined": quarantine_orphans,
            "temporary_files": [p.name for p in files.temporary]}


def format_verify(res: dict) -> str:
    good = res["shards"] - sum(1 for name in res["corrupt"] if name.endswith(".npy")) - len(res["old_layout"])
    lines = [f"{res['key']}: {good} of {res['shards']} committed shard(s) good"]
    for name, reason in res["corrupt"].items():
        lines.append(f"  QUARANTINED {name}: {reason}")
    if res["old_layout"]:
        lines.append(f"  {len(res['old_layout'])} shard(s) in the old layout, left alone (`{MIGRATE_COMMAND}` "
                     f"converts them): {', '.join(res['old_layout'][:5])}{' ...' if len(res['old_layout']) > 5 else ''}")
    if res["orphans"]:
        verb = "moved to quarantine" if res["orphans_quarantined"] else \
            "kept; readers ignore them (--quarantine-orphans moves them)"
        lines.append(f"  {len(res['orphans'])} orphan shard(s) without a commit record, {verb}: "
                     f"{', '.join(res['orphans'][:5])}{' ...' if len(res['orphans']) > 5 else ''}")
    if res["temporary_files"]:
        lines.append(f"  {len(res['temporary_files'])} temporary file(s) left alone (a writer may be at work)")
    return "\n".join(lines)


def not_a_cache(root: Path) -> str | None:
    """Why ``root`` is not a cache directory, or None when it is one (possibly empty): a mistyped
    ``--cache.dir``, a file or an image folder must not pass for a cache with nothing wrong in it."""
    if not root.exists():
        return f"cache directory {root} does not exist"
    if not root.is_dir():
        return f"cache directory {root} is a file, not a directory"
    if not describe_keys(root) and any(p.name != QUARANTINE for p in root.iterdir()):
        return (f"{root} is not an onlinemix cache: none of its entries is a cache key "
                f"(<key>/{GENERATOR_FILE} or <key>/{SHARDS}/)")
    return None


def describe_keys(root: Path) -> dict[str, dict]:
    """Every key with its description, including keys whose ``generator.json`` is missing (shards
    without it are still the cache's data and must be visible to info and verify)."""
    keys = cache_keys(root)
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name != QUARANTINE and d.name not in keys and (d / SHARDS).is_dir():
                keys[d.name] = {}
    return keys

