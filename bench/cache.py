"""The on-disk pair cache's format against webdataset PNG tars, and both against the trainer, in one run.

    python bench/cache.py                  # resolutions 32 (bundled digits), 224 and 512
    python bench/cache.py --quick          # seconds; what tests/test_bench_cache.py runs
    python bench/cache.py --resolutions 224 --mib 512

For each resolution R, N pairs (``--mib`` of raw pixels) are

* written through ``onlinemix.cache.store.ShardWriter`` (raw uint8 ``.npy`` shards, CRC32 of every
  pair, fsync of shard and commit record): the chosen format; and as webdataset tar shards of
  lossless PNGs (``onlinemix.cache.transfer.pair_sample``, the export format; tars fsynced too);
* read back: the cache through ``CacheReader.take`` in random id order (each pair copied into a
  trainer batch buffer), with and without CRC verification; the tars sequentially (tar has no
  random access) through ``webdataset.WebDataset`` with both PNGs decoded. Each read runs
  cold-ish (the files' pages dropped with ``posix_fadvise(DONTNEED)`` first) and warm (again,
  from the page cache);
* compared with the trainer's consumption rate measured in the same run: one trainer step on the
  CPU (``bench/throughput.py``'s ``bench_training``: the product's ``Trainer.augment`` of both views +
  ``Trainer.train_step``), real images per second. "read / trainer" above 1 means one reader
  thread feeds more than one trainer rank.

Pixels: at 32 px the bundled digits and the stub generator's variations of them (what the default
cache holds); at 224 and 512 random crops of a photograph (matplotlib's sample Grace Hopper), since
PNG sizes and speeds depend on content and digits compress far better than photos.
On CPU, torch runs one thread (per-core rates, as bench/throughput.py).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from onlinemix.cache.store import CacheReader, ShardWriter
from onlinemix.files import fsync_path
from onlinemix.cache.transfer import decode_png, pair_sample
from onlinemix.config import CacheConfig, load_config
from onlinemix.data import load_real_images
from onlinemix.generate import make_generator

from common import (RESULTS_DIR, BenchParser, Timer, cpu_name, cpu_snapshot, import_pyplot, load_line,
                    other_cores_since, results_path, run_meta, save_figure, save_results)
from throughput import bench_training

KEY = "bench"
DEFAULTS = {  # (default run, --quick run)
    "resolutions": ("32,224,512", "32"),
    "mib": (128.0, 1.0),
    "train_batch_size": (16, 16),
    "train_steps": (2, 1),
    "train_warmup": (1, 0),
}
READS_RAW = ("cold_verify", "warm_verify", "cold_noverify", "warm_noverify")
READS_PNG = ("cold", "warm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/cache.py",
        description="Write and read (real, synthetic) pairs in the cache's raw uint8 .npy shards and in "
                    "webdataset PNG tars; compare both with the trainer's consumption rate.",
        epilog="Flags left out take the default run's value, or the --quick value with --quick. "
               "Results: a table on stdout, JSON at --out and a PNG plot next to it.",
        defaults=DEFAULTS, quick_help="32 px, 1 MiB, one trainer step: a few seconds")
    q = p.default_note
    p.add_argument("--resolutions", default=None, help=f"comma-separated image sides R {q('resolutions')}")
    p.add_argument("--mib", type=float, default=None,
                   help=f"raw pixel MiB per resolution; sets the pair count N = MiB / (6 R^2 B) {q('mib')}")
    p.add_argument("--shard-pairs", type=int, default=CacheConfig().shard_pairs,
                   help="pairs per cache shard and per tar (default: cache.shard_pairs)")
    p.add_argument("--take-batch", type=int, default=128, help="pairs copied per trainer batch buffer (default 128)")
    p.add_argument("--train-batch-size", type=int, default=None, help=f"trainer batch {q('train_batch_size')}")
    p.add_argument("--train-steps", type=int, default=None, help=f"timed trainer steps {q('train_steps')}")
    p.add_argument("--train-warmup", type=int, default=None, help=f"untimed trainer steps {q('train_warmup')}")
    p.add_argument("--dir", type=Path, default=RESULTS_DIR,
                   help="where the temporary cache and tars go (a directory on the disk to measure; removed "
                        "afterwards; default bench/results)")
    args = p.parse(argv)
    args.resolutions = sorted({int(r) for r in str(args.resolutions).split(",") if r.strip()})
    if not args.resolutions or min(args.resolutions) < 8 or args.mib <= 0 or args.shard_pairs < 1:
        p.error("--resolutions must be >= 8, --mib > 0, --shard-pairs >= 1")
    return args


# ----------------------------------------------------------------------------- pixels

def digits_pairs(n_distinct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bundled digits at 32 px and the stub generator's variations of them."""
    cfg = load_config()
    real = load_real_images(cfg.data).images[:n_distinct]
    synthetic = make_generator(cfg.generator, "cpu", cfg.data.resolution).generate(real, list(range(len(real))))
    return real, synthetic


def photo_pairs(resolution: int, n_distinct: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops (a quarter to all of the area, random flips) of a photograph, resized to R."""
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as img:
        photo = img.convert("RGB")
    rng = np.random.default_rng(seed)
    w, h = photo.size

    def crop() -> torch.Tensor:
        side = int(min(w, h) * np.sqrt(rng.uniform(0.25, 1.0)))
        x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        out = photo.crop((x, y, x + side, y + side)).resize((resolution, resolution), Image.Resampling.BICUBIC)
        arr = np.asarray(out)[:, ::-1] if rng.random() < 0.5 else np.asarray(out)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    return torch.stack([crop() for _ in range(n_distinct)]), torch.stack([crop() for _ in range(n_distinct)])


# ----------------------------------------------------------------------------- measurements

def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files' (clean, fsynced) pages so the next read comes from the disk, not RAM."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_raw(root: Path, pairs: np.ndarray, shard_pairs: int) -> float:
    """Seconds to commit every pair through ShardWriter (CRC32, np.save, fsync, rename, record)."""
    r = pairs.shape[-1]
    t0 = time.perf_counter()
    writer = ShardWriter(root, KEY, {"fingerprint": KEY, "identity": {}, "dataset": "bench"}, r, shard_pairs,
                         flush_s=float("inf"))
    for i, pair in enumerate(pairs):
        writer.add(i, i, 0, pair[0], pair[1])
    writer.close()
    seconds = time.perf_counter() - t0
    if writer.committed != len(pairs):
        raise RuntimeError(f"ShardWriter committed {writer.committed} of {len(pairs)} pairs")
    return seconds


def read_raw(root: Path, r: int, take_batch: int, verify: bool, order: np.ndarray) -> float:
    """Seconds to take every pair once, random id order, copied into a trainer batch buffer."""
    out = np.empty((take_batch, 2, 3, r, r), dtype=np.uint8)
    t0 = time.perf_counter()
    reader = CacheReader(root, KEY, r, verify=verify)
    if len(reader) != len(order):
        raise RuntimeError(f"CacheReader sees {len(reader)} of {len(order)} pairs")
    for j, real_id in enumerate(order.tolist()):
        got = reader.take(real_id)
        if got is None:
            raise RuntimeError(f"pair {real_id} missing or corrupt")
        out[j % take_batch] = got[0]
    return time.perf_counter() - t0


def write_png(tars: Path, pairs: np.ndarray, shard_pairs: int) -> float:
    """Seconds to PNG-encode every pair into webdataset tars of ``shard_pairs`` samples, fsynced."""
    import webdataset as wds

    desc = {"fingerprint": KEY, "identity": {}, "dataset": "bench", "resolution": pairs.shape[-1]}
    t0 = time.perf_counter()
    with wds.ShardWriter(str(tars / "bench-%06d.tar"), maxcount=shard_pairs, verbose=0) as sink:
        for i, pair in enumerate(pairs):
            sink.write(pair_sample(pair, i, i, 0, desc))
    for path in tars.glob("*.tar"):
        fsync_path(path)
    return time.perf_counter() - t0


def read_png(tars: Path, pairs: np.ndarray) -> tuple[float, bool]:
    """Seconds to read every sample in order and decode both PNGs; and whether all came back exact."""
    import webdataset as wds

    urls = sorted(str(p) for p in tars.glob("*.tar"))
    t0 = time.perf_counter()
    decoded = [(json.loads(s["json"])["real_id"], decode_png(s["real.png"]), decode_png(s["synthetic.png"]))
               for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    seconds = time.perf_counter() - t0
    exact = len(decoded) == len(pairs) and all(np.array_equal(pairs[i, 0], a) and np.array_equal(pairs[i, 1], b)
                                               for i, a, b in decoded)
    return seconds, exact


def bench_resolution(args: argparse.Namespace, r: int, work: Path, bar: tqdm) -> dict:
    pair_bytes = 2 * 3 * r * r
    n = max(args.take_batch, round(args.mib * 2**20 / pair_bytes))
    bar.set_description(f"R={r}: pixels")
    real, synthetic = digits_pairs(min(n, 256)) if r == 32 else photo_pairs(r, min(n, 64))
    tile = torch.arange(n) % len(real)
    pairs = torch.stack([real[tile], synthetic[tile]], dim=1).numpy()  # (n, 2, 3, R, R)
    raw_root, tars = work / f"raw-{r}", work / f"png-{r}"
    tars.mkdir(parents=True)
    order = np.random.default_rng(r).permutation(n)

    bar.set_description(f"R={r}: raw write")
    raw_write = write_raw(raw_root, pairs, args.shard_pairs)
    raw_files = sorted((raw_root / KEY).rglob("*.npy"))
    raw_read = {}
    for name in READS_RAW:
        bar.set_description(f"R={r}: raw read {name}")
        if name.startswith("cold"):
            drop_page_cache(raw_files)
        raw_read[name] = n / read_raw(raw_root, r, args.take_batch, name.endswith("_verify"), order)
    bar.update()

    bar.set_description(f"R={r}: png write")
    png_write = write_png(tars, pairs, args.shard_pairs)
    png_read, lossless = {}, True
    for name in READS_PNG:
        bar.set_description(f"R={r}: png read {name}")
        if name == "cold":
            drop_page_cache(sorted(tars.glob("*.tar")))
        seconds, exact = read_png(tars, pairs)
        png_read[name] = n / seconds
        lossless &= exact
    bar.update()

    bar.set_description(f"R={r}: trainer")
    cfg = load_config(None, {"data.resolution": str(r)})
    trainer = bench_training(cfg, torch.device("cpu"), torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1]),
                             args.train_batch_size, args.train_steps, args.train_warmup,
                             partial(Timer, torch.device("cpu")), bar)
    raw_bytes = sum(p.stat().st_size for p in (raw_root / KEY).rglob("*") if p.is_file())
    png_bytes = sum(p.stat().st_size for p in tars.glob("*.tar"))
    shutil.rmtree(raw_root)
    shutil.rmtree(tars)
    rate = trainer["img_s"]
    return {
        "resolution": r, "pairs": n, "pair_bytes": pair_bytes, "pixels": "digits + stub" if r == 32 else "photo crops",
        "trainer": trainer,
        "raw": {"write_pairs_s": n / raw_write, "read_pairs_s": raw_read, "bytes_per_pair": raw_bytes / n},
        "webdataset_png": {"write_pairs_s": n / png_write, "read_pairs_s": png_read, "bytes_per_pair": png_bytes / n,
                           "lossless": lossless},
        "read_over_trainer": {**{f"raw_{k}": v / rate for k, v in raw_read.items()},
                              **{f"png_{k}": v / rate for k, v in png_read.items()}},
        "raw_over_png": {"write": (n / raw_write) / (n / png_write),
                         "read_warm": raw_read["warm_verify"] / png_read["warm"],
                         "read_cold": raw_read["cold_verify"] / png_read["cold"]},
    }


def filesystem(path: Path) -> str:
    """The filesystem type and device under ``path`` (longest matching mount point in /proc/mounts)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, dev, fstype)
    except OSError:
        pass
    return f"{best[2]} on {best[1]}"


# ----------------------------------------------------------------------------- output

def format_report(res: dict) -> str:
    m = res["meta"]
    lines = [f"machine     {m['cpu']} ({m['cpu_count']} logical cores), torch threads {m['threads']}",
             f"disk        {m['filesystem']} (cold reads: pages dropped with posix_fadvise DONTNEED)",
             f"date        {m['date']}", load_line(m), ""]
    head = (f"  {'format':<22}{'write':>9}{'cold':>9}{'warm':>9}{'cold/tr':>9}{'warm/tr':>9}{'B/pair':>10}")
    for row in res["resolutions"]:
        tr, raw, png = row["trainer"], row["raw"], row["webdataset_png"]
        lines += [f"R = {row['resolution']} ({row['pairs']} pairs, {row['pixels']}); pairs/s; trainer "
                  f"{tr['img_s']:.1f} img/s (batch {tr['batch_size']}, {100 * tr['augment_fraction']:.0f}% augment)",
                  head]
        for label, cold, warm in (("raw .npy, CRC verify", "cold_verify", "warm_verify"),
                                  ("raw .npy, no verify", "cold_noverify", "warm_noverify")):
            lines.append(f"  {label:<22}{raw['write_pairs_s']:>9,.0f}{raw['read_pairs_s'][cold]:>9,.0f}"
                         f"{raw['read_pairs_s'][warm]:>9,.0f}{row['read_over_trainer']['raw_' + cold]:>8.0f}x"
                         f"{row['read_over_trainer']['raw_' + warm]:>8.0f}x{raw['bytes_per_pair']:>10,.0f}")
        lines.append(f"  {'webdataset PNG tar':<22}{png['write_pairs_s']:>9,.0f}{png['read_pairs_s']['cold']:>9,.0f}"
                     f"{png['read_pairs_s']['warm']:>9,.0f}{row['read_over_trainer']['png_cold']:>8.1f}x"
                     f"{row['read_over_trainer']['png_warm']:>8.1f}x{png['bytes_per_pair']:>10,.0f}")
        ratio = row["raw_over_png"]
        lines += [f"  raw / PNG: write {ratio['write']:.1f}x, read {ratio['read_cold']:.1f}x cold, "
                  f"{ratio['read_warm']:.1f}x warm; PNG takes {png['bytes_per_pair'] / raw['bytes_per_pair']:.2f}x "
                  f"the raw bytes; PNG round trip {'exact' if png['lossless'] else 'NOT EXACT'}", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/cache.py")
    rows = res["resolutions"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        labels = ["raw write", "raw cold", "raw warm", "raw warm\nno CRC", "PNG write", "PNG cold", "PNG warm"]
        values = [row["raw"]["write_pairs_s"], row["raw"]["read_pairs_s"]["cold_verify"],
                  row["raw"]["read_pairs_s"]["warm_verify"], row["raw"]["read_pairs_s"]["warm_noverify"],
                  row["webdataset_png"]["write_pairs_s"], row["webdataset_png"]["read_pairs_s"]["cold"],
                  row["webdataset_png"]["read_pairs_s"]["warm"]]
        ax.bar(range(len(values)), values, color=["C0"] * 4 + ["C1"] * 3)
        ax.axhline(row["trainer"]["img_s"], color="k", ls="--", label="trainer (1 CPU thread)")
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"R = {row['resolution']}")
        ax.set_ylabel("pairs / s")
        ax.legend(fontsize=8)
    fig.suptitle(f"cache formats on {res['meta']['filesystem']}, {res['meta']['cpu']}", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    out = results_path(args.out, "bench/cache.py")
    out.parent.mkdir(parents=True, exist_ok=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    load_before, before = os.getloadavg()[0], cpu_snapshot()
    work = Path(tempfile.mkdtemp(prefix=".cache-bench-", dir=args.dir))
    try:
        with tqdm(total=2 * len(args.resolutions) + sum(args.train_steps + args.train_warmup
                                                        for _ in args.resolutions), dynamic_ncols=True) as bar:
            rows = [bench_resolution(args, r, work, bar) for r in args.resolutions]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {
        "meta": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                 "filesystem": filesystem(args.dir), "torch": torch.__version__,
                 **run_meta(load_before, other_cores_since(before), args.quick, "bench/cache.py", argv)},
        "config": {"resolutions": args.resolutions, "mib": args.mib, "shard_pairs": args.shard_pairs,
                   "take_batch": args.take_batch, "train_batch_size": args.train_batch_size,
                   "train_steps": args.train_steps},
        "resolutions": rows,
        "summary": {"png_lossless": all(r["webdataset_png"]["lossless"] for r in rows),
                    "min_raw_read_over_trainer": min(min(v for k, v in r["read_over_trainer"].items()
                                                         if k.startswith("raw")) for r in rows),
                    "min_png_read_over_trainer": min(min(v for k, v in r["read_over_trainer"].items()
                                                         if k.startswith("png")) for r in rows)},
    }
    png = save_results(res, out, plot, _T0, started)
    print(format_report(res))
    print(f"wrote {out} and {png}; {res['meta']['wall_s']:.1f}s in all")
    return res


if __name__ == "__main__":
    main()
