"""``cache export`` / ``cache import``: the cache as webdataset tar shards, and back.

Tars of lossless PNGs are the portable form (any webdataset reader, a third of the bytes for
photos); the cache itself stays raw uint8, which is what trainers read fast (``bench/cache.py``).
One sample per pair: ``__key__`` = ``<real_id>-<seed>``, ``real.png``, ``synthetic.png`` and a
``json`` with what made it, including the generator identity, so an import recreates the key's
``generator.json`` exactly and a round trip is bit-identical.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..files import json_text
from .maintenance import check_shard, committed_records
from .store import INDEX, CacheError, ShardWriter, cache_key, cache_keys, check_writable

PNG_COMPRESS_LEVEL = 6  # PIL's default: zlib level 6
PARTIAL = ".partial"  # suffix of a tar while its export runs


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (3, H, W) -> lossless RGB PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (3, H, W) RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def pair_sample(pair: np.ndarray, real_id: int, seed: int, epoch: int, desc: dict) -> dict:
    """One webdataset sample of a (2, 3, R, R) pair."""
    meta = {"real_id": real_id, "seed": seed, "epoch": epoch, "fingerprint": desc["fingerprint"],
            "guidance": desc.get("identity", {}).get("guidance"), "dataset": desc["dataset"],
            "resolution": desc["resolution"], "identity": desc.get("identity", {})}
    return {"__key__": f"{real_id}-{seed}", "real.png": encode_png(pair[0]), "synthetic.png": encode_png(pair[1]),
            "json": json_text(meta).encode()}


def committed_pairs(root: Path, key: str) -> Iterator[tuple[np.ndarray, int, int, int]]:
    """(pair, real_id, seed, epoch) of every committed pair of a key; a corrupt shard stops the export."""
    for record, shard in committed_records(root, key):
        reason = check_shard(root / key / INDEX / f"{shard.stem}.json", shard)
        if reason:
            raise CacheError(f"shard {shard} is corrupt ({reason}); run `python -m onlinemix.cache verify` first")
        pairs = np.load(shard, mmap_mode="r")
        for row, (real_id, seed, epoch) in enumerate(zip(record["ids"], record["seeds"], record["epochs"], strict=True)):
            yield pairs[row], real_id, seed, epoch


def export(root: Path, out: Path, keys: list[str], maxcount: int) -> dict[str, int]:
    """Write every committed pair of the given keys (all when empty) to ``out/<key>-NNNNNN.tar``.

    Tars are written under temporary names (``.<key>-NNNNNN.tar.partial``) and renamed once every
    key is exported, so an export that stops (a corrupt shard, Ctrl-C) leaves no tar, empty or partial;
    temporary tars of these keys left by an export that was killed are removed first."""
    import webdataset as wds

    described = cache_keys(root)
    chosen = [k for k in described if not keys or any(k.startswith(p) for p in keys)]
    if not chosen:
        raise CacheError(f"cache {root} has no key matching {keys or 'anything'} (it holds {list(described) or 'nothing'})")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partials = lambda: [p for key in chosen for p in out.glob(f".{key}-*.tar{PARTIAL}")]  # noqa: E731
    for stale in partials():
        stale.unlink()
    written = {}
    try:
        for key in chosen:
            desc = described[key]
            n = 0
            with wds.ShardWriter(str(out / f".{key}-%06d.tar{PARTIAL}"), maxcount=maxcount, verbose=0) as sink:
                for pair, real_id, seed, epoch in tqdm(committed_pairs(root, key), unit="pair",
                                                       desc=f"export {key[:16]}", dynamic_ncols=True, leave=False):
                    sink.write(pair_sample(pair, real_id, seed, epoch, desc))
                    n += 1
            written[key] = n
    except BaseException:
        for partial in partials():
            partial.unlink()
        if created:
            out.rmdir()
        raise
    for partial in partials():
        partial.rename(out / partial.name[1:].removesuffix(PARTIAL))
    return written


def tar_urls(sources: list[str]) -> list[str]:
    """Tar files, directories of tars and brace patterns (``'s-{000..009}.tar'``) -> tar paths."""
    from braceexpand import braceexpand  # a webdataset dependency

    urls = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            urls += sorted(str(p) for p in path.glob("*.tar"))
        elif "{" in src:
            urls += list(braceexpand(src))
        elif path.is_file():
            urls.append(src)
        else:
            raise CacheError(f"import source {src} does not exist")
    if not urls:
        raise CacheError(f"no .tar shards in {sources}")
    return urls


class _Importer:
    """One ShardWriter per cache key met in the samples; skips pairs the cache already holds."""

    def __init__(self, root: Path, shard_pairs: int) -> None:
        self.root, self.shard_pairs = root, shard_pairs
        self.writers: dict[str, ShardWriter] = {}
        self.present: dict[str, set[tuple[int, int]]] = {}
        self.added = self.skipped = 0

    def _writer(self, meta: dict) -> tuple[ShardWriter, set[tuple[int, int]]]:
        key = cache_key(meta["fingerprint"], meta["dataset"])
        if key not in self.writers:
            desc = {"fingerprint": meta["fingerprint"], "identity": meta.get("identity") or {"guidance": meta["guidance"]},
                    "dataset": meta["dataset"]}
            self.present[key] = {pair for record, _ in committed_records(self.root, key)
                                 for pair in zip(record["ids"], record["seeds"], strict=True)}
            self.writers[key] = ShardWriter(self.root, key, desc, meta["resolution"], self.shard_pairs,
                                            flush_s=float("inf"))
        return self.writers[key], self.present[key]

    def add(self, sample: dict) -> None:
        where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
        try:
            meta = json.loads(sample["json"])
            real, synthetic = decode_png(sample["real.png"]), decode_png(sample["synthetic.png"])
        except (KeyError, ValueError, OSError) as e:
            raise CacheError(f"{where} is not an exported cache pair ({e.__class__.__name__}: {e})") from e
        r = meta["resolution"]
        if real.shape != (3, r, r) or synthetic.shape != (3, r, r):
            raise CacheError(f"{where}: images {real.shape} / {synthetic.shape}, its json says resolution {r}")
        writer, present = self._writer(meta)
        if (meta["real_id"], meta["seed"]) in present:
            self.skipped += 1
            return
        writer.add(meta["real_id"], meta["seed"], meta["epoch"], real, synthetic)
        if writer.disabled:
            raise CacheError(f"cache {self.root} stopped accepting pairs (see the warning above)")
        present.add((meta["real_id"], meta["seed"]))
        self.added += 1

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def import_tars(root: Path, sources: list[str], shard_pairs: int) -> tuple[int, int, list[str]]:
    """Read exported tars into the cache: (pairs added, pairs skipped as present, keys touched).

    A tar that is not one, or is cut short, stops the import with its name and the pairs imported
    before it, which are committed (an import again skips them)."""
    import webdataset as wds

    check_writable(root)
    urls = tar_urls(sources)
    importer = _Importer(root, shard_pairs)
    try:
        for url in urls:
            before = importer.added + importer.skipped
            try:
                for sample in tqdm(wds.WebDataset([url], shardshuffle=False, empty_check=False), unit="pair",
                                   desc=f"import {Path(url).name}", dynamic_ncols=True, leave=False):
                    importer.add(sample)
            except tarfile.ReadError as e:
                read = importer.added + importer.skipped - before
                what = f"is cut short after {read} pairs" if read else "is not a tar archive, or is empty"
                raise CacheError(f"{url} {what} ({e.args[0] if e.args else e}); imported {importer.added} pairs "
                                 f"(committed; skipped {importer.skipped} already cached) before it stopped: copy or "
                                 "export that file again and import it (pairs already imported are skipped)") from None
    finally:
        importer.close()
    return importer.added, importer.skipped, sorted(importer.writers)
