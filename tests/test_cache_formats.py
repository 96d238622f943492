"""The cache's storage formats: synthetic images only (the real half read from the image store by id),
raw and JPEG shards side by side, corrupt JPEG shards, and caches written in the old layout (refused,
then migrated in place)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from isal.isal_zlib import crc32
from PIL import Image

from onlinemix.cache import CacheError, CacheReader, ShardWriter, cache_key, check_writable
from onlinemix.cache.maintenance import verify_key
from onlinemix.cache.migrate import SUFFIX, convert, migrate
from onlinemix.cache.store import GENERATOR_FILE, INDEX, MIGRATE_COMMAND, QUARANTINE, SHARDS, read_record
from onlinemix.core.config import StalenessConfig
from onlinemix.data.prepare import Settings, prepare
from onlinemix.data.sources import array_source
from onlinemix.data.store import ImageStore
from onlinemix.exchange.lookup import PairSource

R = 64
KEY = cache_key("f" * 16, "photos")
DESCRIPTION = {"fingerprint": "f" * 16, "identity": {"guidance": 3.0}, "dataset": "photos"}
# JPEG at quality 95 (torchvision, 4:2:0 chroma) on these photo crops: mean error 1.1-1.5 levels, PSNR
# 41-44 dB (quality 75 misses both bounds). bench/cache.py measures the same on photos resized to 224/256 px.
JPEG_MAX_MEAN_ERROR, JPEG_MIN_PSNR = 2.0, 38.0


def photos(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 3, R, R) crops of a photograph at its own scale: what JPEG is made for."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as img:
        photo = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, photo.shape[1] - R, n), rng.integers(0, photo.shape[2] - R, n)
    return np.stack([photo[:, y:y + R, x:x + R] for y, x in zip(ys, xs)])


def writer(root: Path, fmt: str, shard_pairs: int = 4) -> ShardWriter:
    return ShardWriter(root, KEY, DESCRIPTION, R, shard_pairs, flush_s=3600.0, fmt=fmt)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_jpeg_round_trip_is_within_tolerance_and_checksummed_on_its_bytes(tmp_path: Path) -> None:
    images = photos(6)
    w = writer(tmp_path, "jpeg")
    for i, image in enumerate(images):
        w.add(i, 10 + i, 0, image)
    w.close()
    records = sorted((tmp_path / KEY / INDEX).glob("*.json"))
    record = json.loads(records[0].read_text())
    assert (record["version"], record["format"], record["quality"], record["pairs"]) == (2, "jpeg", 95, 4)
    data = np.load(tmp_path / KEY / SHARDS / record["shard"])
    assert data.ndim == 1 and len(data) == sum(record["lengths"]) < 4 * 3 * R * R / 3
    offsets = np.cumsum([0, *record["lengths"]])
    for row in range(4):
        jpeg = data[offsets[row]:offsets[row + 1]]
        assert bytes(jpeg[:2]) == b"\xff\xd8" and record["checksums"][row] == crc32(jpeg)
    served = CacheReader(tmp_path, KEY, R).take(range(6))
    decoded = np.stack([s.image.numpy() for s in served])
    assert [s.variation.seed for s in served] == [10 + i for i in range(6)]
    assert np.abs(decoded.astype(int) - images).mean() <= JPEG_MAX_MEAN_ERROR
    assert psnr(decoded, images) >= JPEG_MIN_PSNR

    shard = tmp_path / KEY / SHARDS / record["shard"]
    raw = bytearray(shard.read_bytes())
    raw[128 + offsets[2] + 300] ^= 0x40  # inside the third JPEG's entropy-coded data
    shard.write_bytes(bytes(raw))
    reader = CacheReader(tmp_path, KEY, R)
    assert reader.take([2]) == [None] and reader.take([0]) == [None]  # its shard is skipped as a whole
    assert reader.take([4])[0] is not None  # the other shard still serves

    assert verify_key(tmp_path, KEY, quarantine_orphans=False)["corrupt"] == {
        shard.name: "1 of 4 jpeg images fail their CRC32 (first: row 2)"}
    assert (tmp_path / QUARANTINE / KEY / SHARDS / shard.name).is_file() and not shard.exists()
    assert verify_key(tmp_path, KEY, quarantine_orphans=False)["corrupt"] == {}


def test_raw_and_jpeg_shards_of_one_key_are_each_read_as_their_record_says(tmp_path: Path) -> None:
    images = photos(8)
    raw, jpeg = writer(tmp_path, "raw"), writer(tmp_path, "jpeg")
    jpeg.name = raw.name + "-jpeg"
    for i in range(4):
        raw.add(i, 0, 0, images[i])
        jpeg.add(4 + i, 0, 0, images[4 + i])
    served = CacheReader(tmp_path, KEY, R).take(range(8))
    assert [s.variation.format for s in served] == ["raw"] * 4 + ["jpeg"] * 4
    assert np.array_equal(np.stack([s.image.numpy() for s in served[:4]]), images[:4])  # raw: bit for bit
    decoded = np.stack([s.image.numpy() for s in served[4:]])
    assert not np.array_equal(decoded, images[4:]) and psnr(decoded, images[4:]) >= JPEG_MIN_PSNR


def test_a_served_disk_pair_takes_its_real_half_from_the_image_store(tmp_path: Path) -> None:
    n = 12
    pixels = photos(n, seed=1)
    prepare(array_source("photos", pixels, np.zeros(n, dtype=np.int64), ["a"], "photos-12"), tmp_path / "store",
            Settings(size=R), workers=1, progress=False)
    store = ImageStore.open(tmp_path / "store")
    synthetic = 255 - pixels  # stands apart from every real image
    w = writer(tmp_path / "cache", "raw")
    for i in (3, 7):
        w.add(i, 0, 0, synthetic[i])
    w.close()
    cache = CacheReader(tmp_path / "cache", KEY, R)
    source = PairSource(None, StalenessConfig(policy="wait"), store, verify=True, health_check=lambda: None,
                        cache=cache)
    ids = np.array([7, 5, 3, 11])
    with source.get(ids, np.arange(4), epoch=0) as batch:
        assert batch.images.is_synthetic.tolist() == [True, False, True, False]
        assert torch.equal(batch.images.real, store[ids])  # every real half is the store's image of its id
        assert torch.equal(batch.images.other[[0, 2]], torch.from_numpy(synthetic[[7, 3]]))
        assert torch.equal(batch.images.other[[1, 3]], store[[5, 11]])  # no variation: the real image again


# ----------------------------------------------------------------------------- the old layout

def write_old_layout(root: Path, pairs: np.ndarray, shard_pairs: int = 4) -> list[str]:
    """A key as cache format 1 wrote it: (n, 2, 3, R, R) shards of real + synthetic pairs, records without
    a version, ``generator.json`` with ``"format": 1``. Image i gets seed 100 + i and epoch i % 3."""
    key_dir = root / KEY
    (key_dir / SHARDS).mkdir(parents=True)
    (key_dir / INDEX).mkdir()
    (key_dir / GENERATOR_FILE).write_text(json.dumps({"format": 1, "resolution": R, **DESCRIPTION}))
    names = []
    for start in range(0, len(pairs), shard_pairs):
        name, chunk = f"old-{start:06d}", pairs[start:start + shard_pairs]
        ids = list(range(start, start + len(chunk)))
        np.save(key_dir / SHARDS / f"{name}.npy", chunk)
        (key_dir / INDEX / f"{name}.json").write_text(json.dumps(
            {"shard": f"{name}.npy", "pairs": len(chunk), "resolution": R, "created": 1000.0 + start, "ids": ids,
             "seeds": [100 + i for i in ids], "epochs": [i % 3 for i in ids], "checksums": [crc32(p) for p in chunk]}))
        names.append(name)
    return names


def old_pairs(n: int) -> np.ndarray:
    return np.ascontiguousarray(np.stack([photos(n, seed=2), photos(n, seed=3)], axis=1))


def test_a_cache_in_the_old_layout_is_refused_with_how_to_migrate(tmp_path: Path) -> None:
    write_old_layout(tmp_path, old_pairs(4))
    for refuse in (lambda: CacheReader(tmp_path, KEY, R), lambda: check_writable(tmp_path),
                   lambda: verify_key(tmp_path, KEY, quarantine_orphans=False)):
        with pytest.raises(CacheError) as e:
            refuse()
        assert "older layout" in str(e.value) and f"`{MIGRATE_COMMAND} --cache.dir {tmp_path}`" in str(e.value)


def test_migrate_keeps_every_synthetic_image_bit_for_bit_and_resumes(tmp_path: Path) -> None:
    pairs = old_pairs(10)
    names = write_old_layout(tmp_path, pairs)
    # A migrate killed after committing the first converted shard, before removing the old one.
    first = tmp_path / KEY / INDEX / f"{names[0]}.json"
    convert(tmp_path / KEY, read_record(first), np.load(tmp_path / KEY / SHARDS / f"{names[0]}.npy"), "raw", 95,
            names[0] + SUFFIX)
    (res,) = migrate(tmp_path, "raw", 95)
    assert (res["migrated"], res["resumed"], res["corrupt"]) == (2, 1, {})
    assert sorted(p.stem for p in (tmp_path / KEY / SHARDS).glob("*.npy")) == [n + SUFFIX for n in names]
    assert json.loads((tmp_path / KEY / GENERATOR_FILE).read_text()) == {**DESCRIPTION, "resolution": R, "version": 2}
    reader = CacheReader(tmp_path, KEY, R)
    assert len(reader) == 10  # each variation once: the interrupted shard was not converted twice
    for i in range(10):
        (v,) = reader.variations(i)
        assert (v.seed, v.epoch, v.format, v.created) == (100 + i, i % 3, "raw", 1000.0 + 4 * (i // 4))
        assert np.array_equal(reader.read(v).numpy(), pairs[i, 1])
    assert migrate(tmp_path, "raw", 95)[0]["migrated"] == 0  # nothing left to do


def test_migrate_to_jpeg_and_a_corrupt_old_shard_goes_to_quarantine(tmp_path: Path) -> None:
    pairs = old_pairs(8)
    names = write_old_layout(tmp_path, pairs)
    bad = tmp_path / KEY / SHARDS / f"{names[1]}.npy"
    shutil.copy(bad, tmp_path / "bad.npy")
    data = bytearray(bad.read_bytes())
    data[-7] ^= 0xFF
    bad.write_bytes(bytes(data))
    (res,) = migrate(tmp_path, "jpeg", 95)
    assert res["migrated"] == 1 and res["corrupt"] == {bad.name: "1 of 4 pairs fail their CRC32 (first: row 3)"}
    assert (tmp_path / QUARANTINE / KEY / SHARDS / bad.name).is_file()
    assert (tmp_path / QUARANTINE / KEY / INDEX / f"{names[1]}.json").is_file()
    served = CacheReader(tmp_path, KEY, R).take(range(8))
    assert served[4:] == [None] * 4
    decoded = np.stack([s.image.numpy() for s in served[:4]])
    assert {s.variation.format for s in served[:4]} == {"jpeg"} and psnr(decoded, pairs[:4, 1]) >= JPEG_MIN_PSNR
