"""``cache export`` / ``cache import``: the cache as webdataset tar shards, and back.

Tars are the portable form (any webdataset reader). One sample per cached variation:
``__key__`` = ``<real_id>-<seed>``, the synthetic image as it is stored (``synthetic.png``, lossless,
for raw shards; ``synthetic.jpg``, the shard's JPEG bytes, for jpeg shards) and a ``json`` with
what made it, including the generator identity, so an import recreates the key's ``generator.json``
exactly and a round trip is bit-identical. ``export --with-real`` adds ``real.png``, read from the
key's image store by id, for readers outside onlinemix; import never needs it, so tars exported by
the old layout (real + synthetic PNGs) import too, their synthetic side only.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from onlinemix.cache.maintenance import check_shard, committed_records
from onlinemix.cache.store import (
    INDEX,
    CacheError,
    ShardWriter,
    Variation,
    cache_key,
    cache_keys,
    check_layout,
    check_writable,
    record_variations,
    recorded_noise,
    stored_image,
)
from onlinemix.core.files import json_text

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


def variation_sample(v: Variation, stored: np.ndarray, desc: dict, real: np.ndarray | None = None) -> dict:
    """One webdataset sample of a cached variation, its synthetic image as stored (and ``real``, when given)."""
    meta = {"real_id": v.real_id, "seed": v.seed, "epoch": v.epoch, "noise": v.noise,
            "fingerprint": desc["fingerprint"],
            "guidance": desc.get("identity", {}).get("guidance"), "dataset": desc["dataset"],
            "resolution": desc["resolution"], "identity": desc.get("identity", {})}
    key = f"{v.real_id}-{v.seed}" + (f"-n{round(v.noise * 1000)}" if v.noise else "")  # the cache's distinct triple
    sample = {"__key__": key, "json": json_text(meta).encode()}
    if v.format == "jpeg":
        sample["synthetic.jpg"] = stored.tobytes()
    else:
        sample["synthetic.png"] = encode_png(stored)
    if real is not None:
        sample["real.png"] = encode_png(real)
    return sample


def committed_variations(root: Path, key: str) -> Iterator[tuple[Variation, np.ndarray]]:
    """(variation, stored bytes) of every committed variation of a key; a corrupt shard stops the export."""
    for record, shard in committed_records(root, key):
        reason = check_shard(root / key / INDEX / f"{shard.stem}.json", shard)
        if reason:
            raise CacheError(f"shard {shard} is corrupt ({reason}); run `python -m onlinemix.cache verify` first")
        data = np.load(shard, mmap_mode="r")
        for v in record_variations(record):
            yield v, stored_image(data, v)


def export(root: Path, out: Path, keys: list[str], maxcount: int,
           real_of: Callable[[dict], Callable[[int], np.ndarray]] | None = None) -> dict[str, int]:
    """Write every committed variation of the given keys (all when empty) to ``out/<key>-NNNNNN.tar``;
    with ``real_of`` (a key's description -> its real image by id) each sample also gets ``real.png``.

    Tars are written under temporary names (``.<key>-NNNNNN.tar.partial``) and renamed once every
    key is exported, so an export that stops (a corrupt shard, Ctrl-C) leaves no tar, empty or partial;
    temporary tars of these keys left by an export that was killed are removed first."""
    import webdataset as wds

    described = cache_keys(root)
    chosen = [k for k in described if not keys or any(k.startswith(p) for p in keys)]
    if not chosen:
        raise CacheError(f"cache {root} has no key matching {keys or 'anything'} (it holds {list(described) or 'nothing'})")
    check_layout(root, chosen)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partials = lambda: [p for key in chosen for p in out.glob(f".{key}-*.tar{PARTIAL}")]  # noqa: E731
    for stale in partials():
        stale.unlink()
    written = {}
    try:
        for key in chosen:
            desc = described[key]
            real = real_of(desc) if real_of is not None else None
            n = 0
            with wds.ShardWriter(str(out / f".{key}-%06d.tar{PARTIAL}"), maxcount=maxcount, verbose=0) as sink:
                for v, stored in tqdm(committed_variations(root, key), unit="pair", desc=f"export {key[:16]}",
                                      dynamic_ncols=True, leave=False):
                    sink.write(variation_sample(v, stored, desc, None if real is None else real(v.real_id)))
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
    """One ShardWriter per cache key and format met in the samples; skips variations the cache already holds.
    PNGs are stored in the configured format, JPEGs as they are (never decoded and encoded again)."""

    def __init__(self, root: Path, shard_pairs: int, fmt: str, quality: int) -> None:
        self.root, self.shard_pairs, self.format, self.quality = root, shard_pairs, fmt, quality
        self.writers: dict[tuple[str, str], ShardWriter] = {}
        self.present: dict[str, set[tuple[int, int, float]]] = {}  # per cache key: (real id, seed, noise)
        self.added = self.skipped = 0

    def _writer(self, meta: dict, fmt: str) -> tuple[ShardWriter, set[tuple[int, int, float]]]:
        key = cache_key(meta["fingerprint"], meta["dataset"])
        if key not in self.present:
            self.present[key] = {(v.real_id, v.seed, v.noise) for record, _ in committed_records(self.root, key)
                                 for v in record_variations(record)}
        if (key, fmt) not in self.writers:
            desc = {"fingerprint": meta["fingerprint"], "identity": meta.get("identity") or {"guidance": meta["guidance"]},
                    "dataset": meta["dataset"]}
            self.writers[key, fmt] = ShardWriter(self.root, key, desc, meta["resolution"], self.shard_pairs,
                                                 flush_s=float("inf"), fmt=fmt, quality=self.quality)
        return self.writers[key, fmt], self.present[key]

    def add(self, sample: dict) -> None:
        where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
        try:
            meta = json.loads(sample["json"])
            jpeg = sample.get("synthetic.jpg")
            if jpeg is not None:
                with Image.open(io.BytesIO(jpeg)) as img:  # reads the header only
                    shape = (len(img.getbands()), img.height, img.width) if img.format == "JPEG" else None
            else:
                synthetic = decode_png(sample["synthetic.png"])
                shape = synthetic.shape
        except (KeyError, ValueError, OSError) as e:
            raise CacheError(f"{where} is not an exported cache variation ({e.__class__.__name__}: {e})") from e
        r = meta["resolution"]
        if shape != (3, r, r):
            raise CacheError(f"{where}: synthetic image {shape}, its json says an RGB image of resolution {r}")
        writer, present = self._writer(meta, "jpeg" if jpeg is not None else self.format)
        variation = (meta["real_id"], meta["seed"], recorded_noise(meta.get("noise", 0.0)))
        if variation in present:
            self.skipped += 1
            return
        if jpeg is not None:
            writer.add_jpeg(*variation[:2], meta["epoch"], np.frombuffer(jpeg, dtype=np.uint8), variation[2])
        else:
            writer.add(*variation[:2], meta["epoch"], synthetic, variation[2])
        if writer.disabled:
            raise CacheError(f"cache {self.root} stopped accepting pairs (see the warning above)")
        present.add(variation)
        self.added += 1

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def import_tars(root: Path, sources: list[str], shard_pairs: int, fmt: str = "raw",
                quality: int = 95) -> tuple[int, int, list[str]]:
    """Read exported tars into the cache: (variations added, variations skipped as present, keys touched).

    A tar that is not one, or is cut short, stops the import with its name and the variations imported
    before it, which are committed (an import again skips them)."""
    import webdataset as wds

    check_writable(root)
    urls = tar_urls(sources)
    importer = _Importer(root, shard_pairs, fmt, quality)
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
    return importer.added, importer.skipped, sorted(importer.present)
