"""The cache command (``python -m onlinemix.cache``): warm, resume after SIGKILL, verify, export/import, info.

A tiny ImageFolder dataset (80 random images, 64 of them training images) and the stub generator
keep every warm to seconds. ``warm`` runs as a subprocess (it spawns workers, and one test kills
it); the other subcommands run in-process through ``main``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_variation
from PIL import Image

from onlinemix.cache import __main__ as cache_main
from onlinemix.cache.__main__ import main
from onlinemix.cache.store import INDEX, QUARANTINE, SHARDS, CacheReader, cache_keys
from onlinemix.cache.transfer import decode_png, encode_png
from onlinemix.core.cli import Terminated
from onlinemix.core.config import load_config
from onlinemix.core.schedule import variation_seed
from onlinemix.data import RealImages, load_real_images, select_train_ids
from onlinemix.generation.generator import make_generator
from onlinemix.generation.warm import WarmResult

REPO = Path(__file__).resolve().parent.parent
N_IMAGES, N_TRAIN = 80, 64  # data.holdout_fraction 0.2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / f"class{i % 2}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def real_images(dataset: Path, **overrides: str) -> RealImages:
    """The dataset's images as every process of a run reads them: a store prepared once, beside the data."""
    cfg = load_config(None, {"data.dataset": str(dataset), **overrides})
    return load_real_images(cfg.data, dataset.parent / f"{dataset.name}-stores")


def flags(dataset: Path, cache: Path, *extra: str) -> list[str]:
    return ["--data.dataset", str(dataset), "--cache.dir", str(cache), "--generator.model", "stub",
            "--generator.batch-size", "8", *extra]


def warm_command(dataset: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onlinemix.cache", "warm", *flags(dataset, cache, *extra)]


def run_warm(dataset: Path, cache: Path, *extra: str) -> dict:
    """Run a warm to the end; returns its summary's numbers."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(warm_command(dataset, cache, *extra), capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    words = proc.stdout.split()
    return {"generated": int(words[words.index("generated") + 1]), "skipped": int(words[words.index("skipped") + 1])}


def only_key(cache: Path) -> str:
    (key,) = cache_keys(cache)
    return key


def cached_pairs(cache: Path) -> Counter:
    """(real_id, seed, epoch) -> how many times the cache's committed records hold it."""
    counts: Counter = Counter()
    for record in (cache / only_key(cache) / INDEX).glob("*.json"):
        r = json.loads(record.read_text())
        counts.update(zip(r["ids"], r["seeds"], r["epochs"], strict=True))
    return counts


def expected_pairs(dataset: Path, variations: int) -> set[tuple[int, int, int]]:
    train_ids = real_images(dataset).train_ids.tolist()
    return {(i, variation_seed(0, i, k), k) for k in range(variations) for i in train_ids}


def run_main(*argv: str) -> int | str:
    """The subcommand's exit status, or its error message (``sys.exit(message)``)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code


@pytest.fixture(scope="module")
def warmed(dataset: Path, tmp_path_factory) -> Path:
    """Warm 2 variations with 2 workers, then again: the second warm finds nothing missing.
    (That a warm generates exactly what is missing is tested by the resume after a kill.)"""
    cache = tmp_path_factory.mktemp("warmed") / "cache"
    first = run_warm(dataset, cache, "--variations", "2", "--producers", "2")
    second = run_warm(dataset, cache, "--variations", "2")
    assert (first["generated"], first["skipped"]) == (2 * N_TRAIN, 0)
    assert (second["generated"], second["skipped"]) == (0, 2 * N_TRAIN)
    return cache


def test_warm_generates_exactly_the_missing_pairs_as_an_online_run_would(warmed: Path, dataset: Path,
                                                                         one_torch_thread) -> None:
    counts = cached_pairs(warmed)
    assert set(counts) == expected_pairs(dataset, 2) and set(counts.values()) == {1}
    desc = cache_keys(warmed)[only_key(warmed)]
    assert desc["dataset"] == str(dataset) and desc["resolution"] == 32 and desc["identity"]["guidance"] == 3.0
    # The cached variation k of an image is what a producer generates for it in epoch k.
    cfg = load_config(None, {"data.dataset": str(dataset), "generator.model": "stub"})
    gen = make_generator(cfg.generator, "cpu", 32)
    assert desc["fingerprint"] == gen.fingerprint and desc["identity"] == gen.identity()
    real = real_images(dataset).images
    reader = CacheReader(warmed, only_key(warmed), 32)
    ids = [int(i) for i in real_images(dataset).train_ids[:4]]
    for k in (0, 1):
        seeds = [variation_seed(0, i, k) for i in ids]
        fresh = gen.generate(real[ids], seeds).numpy()
        for j, (i, seed) in enumerate(zip(ids, seeds, strict=True)):
            (v,) = [v for v in reader.variations(i) if v.seed == seed]
            assert v.epoch == k
            assert_same_variation(reader.read(v).numpy(), fresh[j])  # the warm's batches had other sizes


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc (Linux)")
def test_warm_killed_then_resumed_generates_only_what_is_missing(dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(warm_command(dataset, cache, "--variations", "2", "--cache.shard-pairs", "8"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while not list(cache.glob(f"*/{INDEX}/*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "warm ended before committing a shard"
        time.sleep(0.01)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers):  # the workers die with the warm process (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, "warm workers outlived the killed warm process"
        time.sleep(0.05)
    before = cached_pairs(cache)
    assert 0 < sum(before.values()) < 2 * N_TRAIN, "the kill came too late to test a resume"

    resumed = run_warm(dataset, cache, "--variations", "2", "--cache.shard-pairs", "8")
    assert resumed["skipped"] == len(before) and resumed["generated"] == 2 * N_TRAIN - len(before)
    after = cached_pairs(cache)
    assert set(after) == expected_pairs(dataset, 2) and set(after.values()) == {1}  # each (id, k) exactly once


def test_verify_quarantines_a_corrupt_shard_and_keeps_the_rest_readable(warmed: Path, tmp_path: Path,
                                                                       capsys) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(warmed, cache)
    key = only_key(cache)
    shards = sorted((cache / key / SHARDS).glob("*.npy"))
    bad = shards[0]
    data = bytearray(bad.read_bytes())
    data[-100:-90] = bytes(255 - b for b in data[-100:-90])  # inside the pixels, past the .npy header
    bad.write_bytes(bytes(data))
    orphan = cache / key / SHARDS / "orphan-000000.npy"
    shutil.copy(shards[1], orphan)  # a shard without a commit record: listed, never deleted
    assert run_main("verify", "--cache.dir", str(cache)) == 1
    out = capsys.readouterr().out
    assert f"QUARANTINED {bad.name}" in out and "CRC32" in out and "orphan-000000.npy" in out
    assert (cache / QUARANTINE / key / SHARDS / bad.name).is_file()
    assert (cache / QUARANTINE / key / INDEX / f"{bad.stem}.json").is_file()
    assert not bad.exists() and orphan.exists()
    # Every image of the other shards is still served, verified.
    reader = CacheReader(cache, key, 32, verify=True)
    good = Counter()
    for record in (cache / key / INDEX).glob("*.json"):
        good.update(json.loads(record.read_text())["ids"])
    assert len(reader) == sum(good.values()) == 2 * N_TRAIN - json.loads(
        (cache / QUARANTINE / key / INDEX / f"{bad.stem}.json").read_text())["pairs"]
    for real_id, n in good.items():
        assert None not in reader.take([real_id] * n)
    # A second verify finds nothing more to do; with --quarantine-orphans the orphan moves too.
    assert run_main("verify", "--cache.dir", str(cache)) == 0
    assert run_main("verify", "--cache.dir", str(cache), "--quarantine-orphans") == 0
    assert not orphan.exists() and (cache / QUARANTINE / key / SHARDS / orphan.name).is_file()


def test_verify_of_something_that_is_not_a_cache_fails(dataset: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for root, problem in ((tmp_path / "typo", "does not exist"), (blocker, "is a file, not a directory"),
                          (dataset, "is not an onlinemix cache: none of its entries is a cache key")):
        message = run_main("verify", "--cache.dir", str(root))
        assert isinstance(message, str) and f"{root}" in message and problem in message, message
    assert "every committed shard is good" not in capsys.readouterr().out
    (tmp_path / "empty").mkdir()  # an empty cache (nothing written yet) is a cache
    assert run_main("verify", "--cache.dir", str(tmp_path / "empty")) == 0


def same_variations(src: CacheReader, dst: CacheReader) -> None:
    """Both caches hold the same variations (real id, seed, epoch) with the same stored bytes."""
    assert len(src) == len(dst)
    for real_id in range(N_IMAGES):
        a = {v.seed: (v.epoch, v.format, src._stored(v).tobytes()) for v in src.variations(real_id)}
        b = {v.seed: (v.epoch, v.format, dst._stored(v).tobytes()) for v in dst.variations(real_id)}
        assert a == b


def test_export_then_import_gives_identical_pairs(warmed: Path, dataset: Path, tmp_path: Path, capsys) -> None:
    tars, fresh = tmp_path / "tars", tmp_path / "fresh"
    assert run_main("export", "--out", str(tars), "--cache.dir", str(warmed), "--samples-per-tar", "50") == 0
    assert len(list(tars.glob("*.tar"))) == 3  # 128 pairs, 50 per tar
    assert run_main("import", str(tars), "--cache.dir", str(fresh)) == 0
    assert "imported 128 pairs, skipped 0" in capsys.readouterr().out
    assert run_main("import", str(tars), "--cache.dir", str(fresh)) == 0  # nothing twice
    assert "imported 0 pairs, skipped 128" in capsys.readouterr().out
    key = only_key(warmed)
    assert cache_keys(fresh) == cache_keys(warmed)  # same key, same generator description
    same_variations(CacheReader(warmed, key, 32), CacheReader(fresh, key, 32))
    with tarfile.open(sorted(tars.glob("*.tar"))[0]) as tar:  # the synthetic side only, by default
        assert {name.split(".", 1)[1] for name in tar.getnames()} == {"synthetic.png", "json"}

    # --with-real adds each pair's real image, read by id from the key's dataset.
    assert run_main("export", "--out", str(tmp_path / "with-real"), "--cache.dir", str(warmed), "--with-real") == 0
    real = real_images(dataset).images
    with tarfile.open(next((tmp_path / "with-real").glob("*.tar"))) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".real.png"):
                real_id = int(Path(member.name).name.split("-")[0])
                assert np.array_equal(decode_png(tar.extractfile(member).read()), real[real_id].numpy())


def test_jpeg_caches_export_their_jpegs_and_import_them_byte_for_byte(warmed: Path, tmp_path: Path, capsys) -> None:
    key = only_key(warmed)
    jpeg_cache, tars, fresh = tmp_path / "jpeg", tmp_path / "tars", tmp_path / "fresh"
    # The warmed variations, imported into a jpeg cache: PNG samples are encoded at cache.jpeg_quality.
    assert run_main("export", "--out", str(tmp_path / "png"), "--cache.dir", str(warmed)) == 0
    assert run_main("import", str(tmp_path / "png"), "--cache.dir", str(jpeg_cache), "--cache.format", "jpeg") == 0
    assert {json.loads(r.read_text())["format"] for r in (jpeg_cache / key / INDEX).glob("*.json")} == {"jpeg"}
    assert run_main("export", "--out", str(tars), "--cache.dir", str(jpeg_cache)) == 0
    with tarfile.open(next(tars.glob("*.tar"))) as tar:
        assert any(name.endswith(".synthetic.jpg") for name in tar.getnames())
    # Into a raw cache: the JPEGs are kept as they are, never decoded and encoded again.
    assert run_main("import", str(tars), "--cache.dir", str(fresh)) == 0
    assert "imported 128 pairs, skipped 0" in capsys.readouterr().out
    same_variations(CacheReader(jpeg_cache, key, 32), CacheReader(fresh, key, 32))


def test_tars_of_the_old_layout_import_their_synthetic_side(warmed: Path, tmp_path: Path, capsys) -> None:
    """Format 1 exported real.png + synthetic.png per pair: import takes the synthetic image only."""
    import webdataset as wds

    key = only_key(warmed)
    desc = cache_keys(warmed)[key]
    reader = CacheReader(warmed, key, 32)
    (tmp_path / "old").mkdir()
    with wds.TarWriter(str(tmp_path / "old" / "old-000000.tar")) as sink:
        for real_id in range(N_IMAGES):
            for v in reader.variations(real_id):
                meta = {"real_id": real_id, "seed": v.seed, "epoch": v.epoch, "fingerprint": desc["fingerprint"],
                        "guidance": desc["identity"]["guidance"], "dataset": desc["dataset"], "resolution": 32,
                        "identity": desc["identity"]}
                sink.write({"__key__": f"{real_id}-{v.seed}", "json": json.dumps(meta).encode(),
                            "real.png": encode_png(np.zeros((3, 32, 32), dtype=np.uint8)),
                            "synthetic.png": encode_png(reader.read(v).numpy())})
    assert run_main("import", str(tmp_path / "old"), "--cache.dir", str(tmp_path / "fresh")) == 0
    assert "imported 128 pairs, skipped 0" in capsys.readouterr().out
    same_variations(reader, CacheReader(tmp_path / "fresh", key, 32))


def test_commands_on_a_cache_in_the_old_layout_name_migrate(warmed: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(warmed, cache)
    key = only_key(cache)
    meta = cache / key / "generator.json"
    desc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**{k: v for k, v in desc.items() if k != "version"}, "format": 1}))
    for argv in (["verify"], ["export", "--out", str(tmp_path / "tars")], ["import", str(tmp_path / "none")]):
        message = run_main(*argv, "--cache.dir", str(cache))
        assert isinstance(message, str) and f"python -m onlinemix.cache migrate --cache.dir {cache}" in message, argv
    assert run_main("migrate", "--cache.dir", str(cache)) == 0
    assert json.loads(meta.read_text()) == desc
    assert run_main("verify", "--cache.dir", str(cache)) == 0


def test_import_of_a_tar_cut_short_or_not_a_tar_names_it_and_reports_what_was_committed(warmed: Path,
                                                                                       tmp_path: Path) -> None:
    tars, fresh = tmp_path / "tars", tmp_path / "fresh"
    assert run_main("export", "--out", str(tars), "--cache.dir", str(warmed), "--samples-per-tar", "1000") == 0
    (tar,) = tars.glob("*.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[:tar.stat().st_size // 2])
    message = run_main("import", str(cut), "--cache.dir", str(fresh), "--cache.shard-pairs", "16")
    committed = len(CacheReader(fresh, only_key(fresh), 32))
    assert isinstance(message, str) and f"{cut} is cut short after {committed} pairs" in message, message
    assert f"imported {committed} pairs (committed; skipped 0 already cached)" in message and committed > 0
    not_a_tar = tmp_path / "notes.tar"
    not_a_tar.write_text("hello")
    message = run_main("import", str(not_a_tar), "--cache.dir", str(fresh))
    assert f"{not_a_tar} is not a tar archive, or is empty" in message and "imported 0 pairs" in message


def test_export_refused_for_a_corrupt_shard_leaves_nothing_behind(warmed: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(warmed, cache)
    shard = sorted((cache / only_key(cache) / SHARDS).glob("*.npy"))[-1]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "tars"
    message = run_main("export", "--out", str(out), "--cache.dir", str(cache), "--samples-per-tar", "50")
    assert isinstance(message, str) and f"shard {shard} is corrupt" in message
    assert not out.exists()  # no tar, empty or partial, and not the directory the export made


def test_info_reports_counts_histogram_and_leftovers(warmed: Path, dataset: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(warmed, cache)
    key = only_key(cache)
    records = sorted((cache / key / INDEX).glob("*.json"))
    dropped = json.loads(records[0].read_text())
    records[0].unlink()  # its shard becomes an orphan: uncommitted, and its pairs no longer count
    (cache / key / SHARDS / ".half-written.npy.tmp").write_bytes(b"x")
    assert run_main("info", "--cache.dir", str(cache), "--data.dataset", str(dataset), "--coverage", "--json") == 0
    (info,) = json.loads(capsys.readouterr().out)["keys"]
    held = Counter({i: 2 for i in real_images(dataset)
                    .train_ids.tolist()})
    held.subtract(dropped["ids"])
    assert info["pairs"] == 2 * N_TRAIN - dropped["pairs"] and info["shards"] == len(records) - 1
    assert info["images"] == sum(1 for n in held.values() if n)
    assert info["variations_histogram"] == {str(k): v for k, v in sorted(Counter(held.values()).items())}
    assert info["coverage"] == pytest.approx(info["images"] / N_TRAIN) and info["train_images"] == N_TRAIN
    assert info["orphan_shards"] == [f"{records[0].stem}.npy"]
    assert info["temporary_files"] == [".half-written.npy.tmp"]
    assert info["model"] == "stub" and info["guidance"] == 3.0 and info["resolution"] == 32
    assert 2 * N_TRAIN * 3 * 32 * 32 < info["bytes"] < 2 * N_TRAIN * 3 * 32 * 32 * 1.5  # the synthetic images only
    assert run_main("info", "--cache.dir", str(cache)) == 0
    text = capsys.readouterr().out
    assert "1 shard(s) without a commit record" in text and "1 temporary file(s)" in text
    assert f"{2 * N_TRAIN - dropped['pairs']} in {len(records) - 1} shard(s)" in text


def test_warm_into_an_unwritable_cache_fails_at_start(dataset: Path, tmp_path: Path) -> None:
    # Root ignores permission bits, so chmod cannot make a directory unwritable in every test
    # environment; a path under a regular file cannot be created by anyone (ENOTDIR).
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    started = time.monotonic()
    message = run_main("warm", *flags(dataset, blocker / "cache"))
    assert isinstance(message, str) and "not writable" in message and str(blocker / "cache") in message
    assert time.monotonic() - started < 30  # at start: no worker was started, nothing generated
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in str(run_main("warm", *flags(dataset, locked / "cache")))



def test_warm_with_a_generator_that_cannot_load_ends_with_its_message(dataset: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    message = run_main("warm", *flags(dataset, tmp_path / "cache", "--generator.model", str(missing)))
    assert isinstance(message, str) and "warm worker 0 (pid " in message
    assert "failed before it was ready, so it is not restarted (traceback above): " in message
    assert message.endswith(f"generator.model {missing}: no such directory (a local model is a directory with "
                            "model_index.json; a hub id looks like lambdalabs/sd-image-variations-diffusers)")


@pytest.mark.parametrize("stop,status", [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_an_interrupted_warm_exits_with_128_plus_the_signal(stop: type, status: int, monkeypatch) -> None:
    monkeypatch.setattr(cache_main, "warm", lambda cfg, variations, workers: WarmResult("k", 3, 0, 1.0, 1.0, stop()))
    assert run_main("warm") == status


def test_warm_generates_only_the_real_fraction_a_run_trains_on(dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run_warm(dataset, cache, "--data.real-fraction", "0.5")
    cfg = load_config(None, {"data.dataset": str(dataset), "data.real_fraction": "0.5"})
    subset = set(select_train_ids(real_images(dataset, **{"data.real_fraction": "0.5"}), cfg.data).tolist())
    assert result["generated"] == len(subset) == N_TRAIN // 2
    assert {real_id for real_id, _, _ in cached_pairs(cache)} == subset


def test_migrate_names_a_cache_directory_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["migrate", "--cache.dir", str(tmp_path / "typo")])
    assert str(e.value.code) == (f"onlinemix.cache migrate: cache {tmp_path / 'typo'}: no such directory (the cache "
                                 "directory is cache.dir, by default <output_dir>/cache)")
