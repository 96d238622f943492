"""The disk cache's storage rules: atomic shards with commit records, concurrent writers, a
killed writer, corrupt and missing shards, selection order, a full disk, the size limit."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from isal.isal_zlib import crc32

from onlinemix.cache import CacheError, CacheReader, Served, ShardWriter, cache_key, check_writable, select_key
from onlinemix.cache.store import INDEX, SHARDS, evict_to_limit

R = 8
KEY = cache_key("f" * 16, "digits")
DESCRIPTION = {"fingerprint": "f" * 16, "identity": {"guidance": 3.0}, "dataset": "digits"}


def pair(real_id: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([real_id, seed])
    return (rng.integers(0, 256, (3, R, R), dtype=np.uint8), rng.integers(0, 256, (3, R, R), dtype=np.uint8))


def writer(root: Path, shard_pairs: int = 4, max_bytes: int = 0) -> ShardWriter:
    return ShardWriter(root, KEY, DESCRIPTION, R, shard_pairs, flush_s=3600.0, max_bytes=max_bytes)


def write(w: ShardWriter, ids, seed: int = 0) -> None:
    for i in ids:
        w.add(i, seed, 0, pair(i, seed)[1])


def reader(root: Path) -> CacheReader:
    return CacheReader(root, KEY, R)


def take(r: CacheReader, real_id: int) -> Served | None:
    return r.take([real_id])[0]


def test_synthetic_images_come_back_bit_exact_through_the_index(tmp_path: Path) -> None:
    w = writer(tmp_path)
    write(w, range(6))
    w.close()  # 4 images in a full shard, 2 in the flushed partial one
    r = reader(tmp_path)
    assert len(r) == 6 and len(list((tmp_path / KEY / SHARDS).glob("*.npy"))) == 2
    served = r.take([*range(6), 99])
    assert served[6] is None
    for i, got in enumerate(served[:6]):
        assert np.array_equal(got.image.numpy(), pair(i, 0)[1])
        assert (got.variation.real_id, got.variation.seed, got.uses) == (i, 0, 0)


def test_shards_hold_the_synthetic_images_and_no_real_ones(tmp_path: Path) -> None:
    w = writer(tmp_path, shard_pairs=4)
    write(w, range(4))
    (shard,) = (tmp_path / KEY / SHARDS).glob("*.npy")
    assert np.load(shard).shape == (4, 3, R, R)
    data = shard.read_bytes()
    assert len(data) == 4 * 3 * R * R + 128  # the pixels and the .npy header, nothing else
    for i in range(4):
        real, synthetic = pair(i, 0)
        assert synthetic.tobytes() in data and real.tobytes() not in data
    record = json.loads(next((tmp_path / KEY / INDEX).glob("*.json")).read_text())
    assert (record["version"], record["format"]) == (2, "raw")
    assert record["checksums"] == [crc32(pair(i, 0)[1]) for i in range(4)]  # of the stored image alone


def test_a_shard_is_invisible_until_its_commit_record_exists(tmp_path: Path) -> None:
    w = writer(tmp_path)
    write(w, range(4))
    record = next((tmp_path / KEY / INDEX).glob("*.json"))
    hidden = record.with_name("hidden")
    record.rename(hidden)  # as if the writer died between the shard's rename and the record's
    assert len(reader(tmp_path)) == 0
    hidden.rename(record)
    assert len(reader(tmp_path)) == 4


def _write_forever(root: str, shard_pairs: int) -> None:
    w = writer(Path(root), shard_pairs)
    big = np.random.default_rng(0).integers(0, 256, (3, R, R), dtype=np.uint8)
    i = 0
    while True:
        w.add(i, 0, 0, big)
        i += 1


def test_a_writer_killed_mid_shard_leaves_complete_shards_and_nothing_half_written(tmp_path: Path) -> None:
    proc = mp.get_context("spawn").Process(target=_write_forever, args=(str(tmp_path), 16), daemon=True)
    proc.start()
    index = tmp_path / KEY / INDEX
    deadline = time.monotonic() + 60
    while len(list(index.glob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    r = reader(tmp_path)
    assert len(r) >= 48 and len(r) % 16 == 0  # only whole, committed shards are visible
    for real_id, got in enumerate(r.take(range(len(r)))):
        assert got is not None and got.variation.real_id == real_id  # every committed image reads back, checksum intact


def test_two_writers_at_once_do_not_corrupt_each_other(tmp_path: Path) -> None:
    a, b = writer(tmp_path), writer(tmp_path)
    b.name = a.name + "-other"  # two producers in one process still get distinct shard names
    for i in range(12):  # interleaved, as two producers write
        a.add(i, 1, 0, pair(i, 1)[1])
        b.add(i, 2, 0, pair(i, 2)[1])
    a.close()
    b.close()
    r = reader(tmp_path)
    assert len(r) == 24
    for i in range(12):
        assert sorted(v.seed for v in r.variations(i)) == [1, 2]


def test_selection_prefers_the_least_used_then_the_youngest_variation(tmp_path: Path) -> None:
    w = writer(tmp_path, shard_pairs=1)
    write(w, [5], seed=1)
    time.sleep(0.01)
    write(w, [5], seed=2)  # younger
    r = reader(tmp_path)
    assert [take(r, 5).variation.seed for _ in range(4)] == [2, 1, 2, 1]


def test_refresh_sees_shards_committed_after_the_reader_opened(tmp_path: Path) -> None:
    w = writer(tmp_path, shard_pairs=2)
    write(w, [0, 1])
    r = reader(tmp_path)
    write(w, [2, 3])
    assert take(r, 2) is None
    assert r.refresh() == 2 and take(r, 2) is not None


def test_flipped_bytes_and_missing_shards_are_skipped_not_served(tmp_path: Path) -> None:
    w = writer(tmp_path, shard_pairs=2)
    write(w, [0, 1])
    write(w, [0, 1], seed=7)
    shards = sorted((tmp_path / KEY / SHARDS).glob("*.npy"))
    data = bytearray(shards[0].read_bytes())
    data[-5] ^= 0xFF  # inside the last image of the first shard
    shards[0].write_bytes(bytes(data))
    r = reader(tmp_path)
    assert [take(r, 1).variation.seed for _ in range(3)] == [7, 7, 7]  # the corrupt variation is passed over
    assert [take(r, 0).variation.seed for _ in range(2)] == [7, 7]  # and its whole shard is skipped from then on
    shards[1].unlink()
    r = reader(tmp_path)
    assert take(r, 0).variation.seed == 0  # image 0 of the first shard is intact
    assert take(r, 1) is None  # its only other variation is corrupt, the intact one's shard is gone


def test_a_full_disk_stops_caching_with_a_warning_and_leaves_no_partial_file(tmp_path: Path, caplog) -> None:
    w = writer(tmp_path, shard_pairs=64)
    write(w, range(64))  # one shard committed before the disk fills
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        write(w, range(64, 128))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert w.disabled and "new pairs are no longer cached" in caplog.text
    assert w.disabled_reason.startswith(f"cache {tmp_path / KEY}: it cannot be written (")
    write(w, range(128, 192))  # later pairs are dropped quietly, not half-written
    w.close()
    files = [p.name for p in (tmp_path / KEY).rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith(".tmp")]
    assert len(reader(tmp_path)) == 64


def test_an_unwritable_cache_directory_is_an_error_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, so nothing can be created below it (works as root too)")
    with pytest.raises(CacheError, match="not writable"):
        check_writable(blocker / "cache")


def test_size_limit_evicts_the_oldest_shards(tmp_path: Path) -> None:
    w = writer(tmp_path, shard_pairs=4)
    for s in range(3):
        write(w, range(4), seed=s)
        time.sleep(0.02)
    one_shard = sum(p.stat().st_size for p in (tmp_path / KEY).rglob("*-000000.*"))
    assert evict_to_limit(tmp_path, int(2.5 * one_shard)) == 1
    r = reader(tmp_path)
    assert sorted({v.seed for v in r.variations(0)}) == [1, 2]


def test_offline_key_selection_by_dataset_resolution_and_guidance(tmp_path: Path) -> None:
    writer(tmp_path).close()
    other = {**DESCRIPTION, "fingerprint": "e" * 16, "identity": {"guidance": 8.0}}
    ShardWriter(tmp_path, cache_key("e" * 16, "digits"), other, R, 4, 3600.0).close()
    assert select_key(tmp_path, "digits", R, 3.0) == KEY
    with pytest.raises(CacheError, match="no pairs for dataset 'digits', resolution 8, guidance 5.0"):
        select_key(tmp_path, "digits", R, 5.0)
    ShardWriter(tmp_path, cache_key("d" * 16, "digits"), {**DESCRIPTION, "fingerprint": "d" * 16}, R, 4,
                3600.0).close()
    with pytest.raises(CacheError, match="several generators"):
        select_key(tmp_path, "digits", R, 3.0)
    assert select_key(tmp_path, "digits", R, 3.0, fingerprint="ddd") == cache_key("d" * 16, "digits")
    assert json.loads((tmp_path / KEY / "generator.json").read_text())["resolution"] == R


def test_coverage_counts_only_variations_that_read_back_intact(tmp_path: Path, caplog) -> None:
    """Images whose only variations lie in a corrupt shard are not covered (offline start-up must not
    count them: the shard would serve nothing), and the corrupt shard is never served afterwards."""
    w = writer(tmp_path, shard_pairs=4)
    write(w, range(4))          # shard 0: images 0-3, corrupted below
    write(w, [2, 3, 4, 5])      # shard 1: a second variation of 2 and 3, intact
    w.close()
    first = sorted((tmp_path / KEY / SHARDS).glob("*.npy"))[0]
    data = bytearray(first.read_bytes())
    data[-5] ^= 0xFF  # inside the last image (image 3) of shard 0
    first.write_bytes(bytes(data))
    r = CacheReader(tmp_path, KEY, R, verify=False)  # coverage checks CRCs even when reads do not
    assert r.coverage(range(7)).tolist() == [False, False, True, True, True, True, False]
    assert "fails its checksum" in caplog.text
    assert take(r, 0) is None and take(r, 3).variation.shard != first.name
