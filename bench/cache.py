"""The on-disk cache's two formats (raw, jpeg) and webdataset PNG tars, and all against the trainer, in one run.

    python bench/cache.py                  # resolutions 32 (bundled digits), 224, 256 and 512
    python bench/cache.py --quick          # seconds; what tests/test_bench_cache.py runs
    python bench/cache.py --resolutions 224 --mib 512 --jpeg-quality 90
    python bench/cache.py --device cuda --resolutions 224     # JPEG decode with nvJPEG, the trainer on the GPU

The cache stores the synthetic side of each pair (the real image is read from the image store by id).
For each resolution R, N synthetic images (``--mib`` of raw pixels) are

* written through ``onlinemix.cache.store.ShardWriter`` in each ``cache.format``: ``raw`` (uint8
  ``.npy`` shards) and ``jpeg`` (torchvision ``encode_jpeg`` at ``--jpeg-quality``), CRC32 of every
  stored image, fsync of shard and commit record; and as webdataset tar shards of lossless PNGs
  (``onlinemix.cache.transfer.variation_sample``, the export format of raw shards; tars fsynced too);
* read back: the cache through ``CacheReader.take`` in random id order, ``--take-batch`` ids a call as a
  trainer batch asks (JPEGs decoded in one batched call on --device: nvJPEG on a GPU, as a trainer's
  reader does), each image copied into a batch buffer on the CPU, with and without CRC verification; the
  tars sequentially (tar has no random access) through ``webdataset.WebDataset`` with the PNGs decoded. Each read runs cold-ish (the files' pages dropped
  with ``posix_fadvise(DONTNEED)`` first) and warm (again, from the page cache);
* compared with the trainer's consumption rate measured in the same run: one trainer step on
  --device (``bench/throughput.py``'s ``bench_training``: the product's ``Trainer.augment`` of both views +
  ``Trainer.train_step``), real images per second. "read / trainer" above 1 means one reader
  thread feeds more than one trainer rank.

JPEG's loss is reported as PSNR and mean absolute error against the written pixels, and its size as
bits per stored pixel, from which the disk estimates for ImageNet in docs/cache.md are computed.
Pixels: at 32 px the bundled digits and the stub generator's variations of them (what the default
cache holds); at larger R random crops of a photograph (matplotlib's sample Grace Hopper), since
JPEG and PNG sizes and speeds depend on content and digits compress far better than photos.
On the CPU, torch runs one thread (per-core rates, as bench/throughput.py); --device defaults to CUDA
where available.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, BenchParser, int_list, output_path, save_results, scratch_dir, setup_torch
from machine import LoadWatch, cpu_meta, device_name, mount_of
from photos import photo_pairs
from plots import import_pyplot, save_figure
from report import Column, Table, load_line, machine_line
from shards import description, write_shards
from tqdm.auto import tqdm
from trainstep import add_trainer_flags, bench_training

from onlinemix.cache.store import FORMATS, CacheReader, Variation
from onlinemix.cache.transfer import decode_png, variation_sample
from onlinemix.core.config import CacheConfig, load_config
from onlinemix.core.files import fsync_path
from onlinemix.data import load_real_images
from onlinemix.generation.generator import make_generator

KEY = "bench"
DEFAULTS = {  # (default run, --quick run)
    "resolutions": ("32,224,256,512", "32"),
    "mib": (128.0, 1.0),
    "train_batch_size": (16, 16),
    "train_steps": (2, 1),
    "train_warmup": (1, 0),
}
READS_CACHE = ("cold_verify", "warm_verify", "cold_noverify", "warm_noverify")
READS_PNG = ("cold", "warm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/cache.py",
        description="Write and read synthetic images in the cache's raw and jpeg shards and in webdataset PNG "
                    "tars; compare each with the trainer's consumption rate.",
        epilog="Flags left out take the default run's value, or the --quick value with --quick. "
               "Results: a table on stdout, JSON at --out and a PNG plot next to it.",
        defaults=DEFAULTS, quick_help="32 px, 1 MiB, one trainer step: a few seconds")
    q = p.default_note
    p.add_argument("--resolutions", default=None, help=f"comma-separated image sides R {q('resolutions')}")
    p.add_argument("--mib", type=float, default=None,
                   help=f"raw pixel MiB per resolution; sets the image count N = MiB / (3 R^2 B) {q('mib')}")
    p.add_argument("--shard-pairs", type=int, default=CacheConfig().shard_pairs,
                   help="images per cache shard and per tar (default: cache.shard_pairs)")
    p.add_argument("--jpeg-quality", type=int, default=CacheConfig().jpeg_quality,
                   help="quality of the jpeg format (default: cache.jpeg_quality)")
    p.add_argument("--take-batch", type=int, default=128, help="images taken per call, as one trainer batch (default 128)")
    add_trainer_flags(p)
    p.add_torch_flags("They run the trainer step and, on a GPU, the JPEG decode.")
    p.add_argument("--dir", type=Path, default=RESULTS_DIR,
                   help="where the temporary cache and tars go (a directory on the disk to measure; removed "
                        "afterwards; default bench/results)")
    args = p.parse(argv)
    args.resolutions = sorted(set(int_list(p, "--resolutions", args.resolutions)))
    if min(args.resolutions) < 8 or args.mib <= 0 or args.shard_pairs < 1 \
            or not 1 <= args.jpeg_quality <= 100:
        p.error("--resolutions must be >= 8, --mib > 0, --shard-pairs >= 1, --jpeg-quality in 1..100")
    return args


# ----------------------------------------------------------------------------- pixels

def digits_pairs(n_distinct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bundled digits at 32 px and the stub generator's variations of them."""
    cfg = load_config()
    real = load_real_images(cfg.data).images[:n_distinct]
    synthetic = make_generator(cfg.generator, "cpu", cfg.data.resolution).generate(real, list(range(len(real))))
    return real, synthetic


# ----------------------------------------------------------------------------- measurements

def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files' (clean, fsynced) pages so the next read comes from the disk, not RAM."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_cache(root: Path, synthetic: np.ndarray, shard_pairs: int, fmt: str, quality: int) -> float:
    """Seconds to commit every image through ShardWriter (encoding, CRC32, np.save, fsync, rename, record)."""
    t0 = time.perf_counter()
    writer = write_shards(root, KEY, synthetic, shard_pairs, fmt=fmt, quality=quality)
    seconds = time.perf_counter() - t0
    if writer.committed != len(synthetic):
        raise RuntimeError(f"ShardWriter committed {writer.committed} of {len(synthetic)} images")
    return seconds


def read_cache(root: Path, r: int, take_batch: int, verify: bool, order: np.ndarray, device: torch.device) -> float:
    """Seconds to take every image once, random id order, a trainer batch of ids a call, into a batch buffer
    (JPEGs decoded on ``device``, as a trainer's reader does)."""
    buffer = torch.empty((take_batch, 3, r, r), dtype=torch.uint8)
    t0 = time.perf_counter()
    reader = CacheReader(root, KEY, r, verify=verify, device=device)
    if len(reader) != len(order):
        raise RuntimeError(f"CacheReader sees {len(reader)} of {len(order)} images")
    for start in range(0, len(order), take_batch):
        batch = order[start:start + take_batch].tolist()
        for j, (real_id, served) in enumerate(zip(batch, reader.take(batch), strict=True)):
            if served is None:
                raise RuntimeError(f"image {real_id} missing or corrupt")
            buffer[j] = served.image
    return time.perf_counter() - t0


def read_back(root: Path, r: int, n: int) -> np.ndarray:
    """Every image as the cache serves it, by id (untimed: for the round-trip error)."""
    return torch.stack([s.image for s in CacheReader(root, KEY, r).take(range(n))]).numpy()


def write_png(tars: Path, synthetic: np.ndarray, shard_pairs: int) -> float:
    """Seconds to PNG-encode every image into webdataset tars of ``shard_pairs`` samples, fsynced."""
    import webdataset as wds

    desc = {**description(KEY), "resolution": synthetic.shape[-1]}
    t0 = time.perf_counter()
    with wds.ShardWriter(str(tars / "bench-%06d.tar"), maxcount=shard_pairs, verbose=0) as sink:
        for i, image in enumerate(synthetic):
            sink.write(variation_sample(Variation("", i, i, i, 0, 0.0, 0), image, desc))
    for path in tars.glob("*.tar"):
        fsync_path(path)
    return time.perf_counter() - t0


def read_png(tars: Path, synthetic: np.ndarray) -> tuple[float, bool]:
    """Seconds to read every sample in order and decode its PNG; and whether all came back exact."""
    import webdataset as wds

    urls = sorted(str(p) for p in tars.glob("*.tar"))
    t0 = time.perf_counter()
    decoded = [(json.loads(s["json"])["real_id"], decode_png(s["synthetic.png"]))
               for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    seconds = time.perf_counter() - t0
    exact = len(decoded) == len(synthetic) and all(np.array_equal(synthetic[i], a) for i, a in decoded)
    return seconds, exact


def bench_format(args: argparse.Namespace, root: Path, synthetic: np.ndarray, fmt: str, device: torch.device,
                 bar: tqdm) -> dict:
    """Write, read (cold and warm, with and without CRC) and size one cache format; JPEG's loss too."""
    n, r = len(synthetic), synthetic.shape[-1]
    order = np.random.default_rng(r).permutation(n)
    bar.set_description(f"R={r}: {fmt} write")
    write_s = write_cache(root, synthetic, args.shard_pairs, fmt, args.jpeg_quality)
    files = sorted((root / KEY).rglob("*.npy"))
    reads = {}
    for name in READS_CACHE:
        bar.set_description(f"R={r}: {fmt} read {name}")
        if name.startswith("cold"):
            drop_page_cache(files)
        reads[name] = n / read_cache(root, r, args.take_batch, name.endswith("_verify"), order, device)
    stored = sum(p.stat().st_size for p in (root / KEY).rglob("*") if p.is_file())
    shard_bytes = sum(p.stat().st_size for p in files)
    error = read_back(root, r, n).astype(np.float64) - synthetic
    mse = float(np.mean(error**2))
    bar.update()
    return {"write_s": n / write_s, "read_s": reads, "bytes_per_image": stored / n,
            "bits_per_pixel": 8 * shard_bytes / (n * r * r), "exact": mse == 0.0,
            "psnr_db": 10 * np.log10(255**2 / mse) if mse else float("inf"),
            "mean_abs_error": float(np.abs(error).mean())}


def bench_resolution(args: argparse.Namespace, r: int, work: Path, device: torch.device, bar: tqdm) -> dict:
    image_bytes = 3 * r * r
    n = max(args.take_batch, round(args.mib * 2**20 / image_bytes))
    bar.set_description(f"R={r}: pixels")
    real, synthetic = digits_pairs(min(n, 256)) if r == 32 else photo_pairs(r, min(n, 64))
    tile = torch.arange(n) % len(real)
    images = synthetic[tile].numpy()  # (n, 3, R, R): what the cache stores
    formats = {fmt: bench_format(args, work / f"{fmt}-{r}", images, fmt, device, bar) for fmt in FORMATS}

    tars = work / f"png-{r}"
    tars.mkdir(parents=True)
    bar.set_description(f"R={r}: png write")
    png_write = write_png(tars, images, args.shard_pairs)
    png_read, lossless = {}, True
    for name in READS_PNG:
        bar.set_description(f"R={r}: png read {name}")
        if name == "cold":
            drop_page_cache(sorted(tars.glob("*.tar")))
        seconds, exact = read_png(tars, images)
        png_read[name] = n / seconds
        lossless &= exact
    png_bytes = sum(p.stat().st_size for p in tars.glob("*.tar"))
    bar.update()

    bar.set_description(f"R={r}: trainer")
    cfg = load_config(None, {"data.resolution": str(r)})
    trainer = bench_training(cfg, device, real[tile], synthetic[tile], args.train_batch_size,
                             args.train_steps, args.train_warmup, bar)
    for path in [*(work / f"{fmt}-{r}" for fmt in FORMATS), tars]:
        shutil.rmtree(path)
    rate = trainer["img_s"]
    return {
        "resolution": r, "images": n, "image_bytes": image_bytes,
        "pixels": "digits + stub" if r == 32 else "photo crops", "trainer": trainer, "formats": formats,
        "webdataset_png": {"write_s": n / png_write, "read_s": png_read, "bytes_per_image": png_bytes / n,
                           "lossless": lossless},
        "read_over_trainer": {**{f"{fmt}_{k}": v / rate for fmt, f in formats.items() for k, v in f["read_s"].items()},
                              **{f"png_{k}": v / rate for k, v in png_read.items()}},
        "jpeg_over_raw": {"write": formats["jpeg"]["write_s"] / formats["raw"]["write_s"],
                          "read_warm": formats["jpeg"]["read_s"]["warm_verify"] / formats["raw"]["read_s"]["warm_verify"],
                          "read_cold": formats["jpeg"]["read_s"]["cold_verify"] / formats["raw"]["read_s"]["cold_verify"],
                          "bytes": formats["jpeg"]["bytes_per_image"] / formats["raw"]["bytes_per_image"]},
    }


# ----------------------------------------------------------------------------- output

def rate(title: str, key: str, width: int = 9) -> Column:
    """A ``FORMAT_TABLE`` column of images/s (or bytes) without decimals."""
    return Column(title, width, lambda r: f"{r[key]:,.0f}", gap="")


def over_trainer(title: str, key: str) -> Column:
    """A ``FORMAT_TABLE`` column of read / trainer, with the record's digits."""
    return Column(title, 9, lambda r: f"{r[key]:{r['digits']}}x", gap="")


FORMAT_TABLE = Table(Column("format", 24, lambda r: r["label"], "<"), rate("write", "write"), rate("cold", "cold"),
                     rate("warm", "warm"), over_trainer("cold/tr", "cold_tr"), over_trainer("warm/tr", "warm_tr"),
                     rate("B/image", "bytes", 10))


def format_rows(row: dict) -> list[dict]:
    """The records of one resolution's ``FORMAT_TABLE``: each cache format with and without CRC verification,
    then the PNG tars; images/s, and read / trainer ("tr")."""
    over = row["read_over_trainer"]
    records = [{"label": f"{fmt} .npy, {label}", "write": f["write_s"], "cold": f["read_s"][f"cold_{verify}"],
                "warm": f["read_s"][f"warm_{verify}"], "cold_tr": over[f"{fmt}_cold_{verify}"],
                "warm_tr": over[f"{fmt}_warm_{verify}"], "bytes": f["bytes_per_image"], "digits": ".0f"}
               for fmt, f in row["formats"].items()
               for verify, label in (("verify", "CRC verify"), ("noverify", "no verify"))]
    png = row["webdataset_png"]
    return records + [{"label": "webdataset PNG tar", "write": png["write_s"], "cold": png["read_s"]["cold"],
                       "warm": png["read_s"]["warm"], "cold_tr": over["png_cold"], "warm_tr": over["png_warm"],
                       "bytes": png["bytes_per_image"], "digits": ".1f"}]


def format_report(res: dict) -> str:
    m = res["meta"]
    lines = [machine_line(m, f", torch threads {m['threads']}"),
             f"device      {m['device_name']} ({m['device']}): the trainer step and the JPEG decode",
             f"disk        {m['filesystem']} (cold reads: pages dropped with posix_fadvise DONTNEED)",
             f"date        {m['date']}", load_line(m), ""]
    for row in res["resolutions"]:
        tr, png, fmts = row["trainer"], row["webdataset_png"], row["formats"]
        ratio, jpeg = row["jpeg_over_raw"], fmts["jpeg"]
        lines += [f"R = {row['resolution']} ({row['images']} synthetic images, {row['pixels']}); images/s; trainer "
                  f"{tr['img_s']:.1f} img/s (batch {tr['batch_size']}, {100 * tr['augment_fraction']:.0f}% augment)",
                  FORMAT_TABLE.header(), *(FORMAT_TABLE.row(r) for r in format_rows(row)),
                  f"  jpeg / raw: write {ratio['write']:.2f}x, read {ratio['read_cold']:.2f}x cold, "
                  f"{ratio['read_warm']:.2f}x warm, bytes {ratio['bytes']:.3f}x; jpeg q{res['config']['jpeg_quality']} "
                  f"{jpeg['bits_per_pixel']:.2f} bits/pixel, PSNR {jpeg['psnr_db']:.1f} dB, mean |error| "
                  f"{jpeg['mean_abs_error']:.2f}; raw round trip {'exact' if fmts['raw']['exact'] else 'NOT EXACT'}, "
                  f"PNG round trip {'exact' if png['lossless'] else 'NOT EXACT'}", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """A bar chart per resolution: images/s written and read (cold, warm) per format, the trainer's as a line."""
    plt = import_pyplot("bench/cache.py")
    rows = res["resolutions"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        labels, values, colours = [], [], []
        for c, fmt in enumerate(FORMATS):
            f = row["formats"][fmt]
            labels += [f"{fmt} write", f"{fmt} cold", f"{fmt} warm"]
            values += [f["write_s"], f["read_s"]["cold_verify"], f["read_s"]["warm_verify"]]
            colours += [f"C{c}"] * 3
        png = row["webdataset_png"]
        labels += ["PNG write", "PNG cold", "PNG warm"]
        values += [png["write_s"], png["read_s"]["cold"], png["read_s"]["warm"]]
        colours += ["C2"] * 3
        ax.bar(range(len(values)), values, color=colours)
        ax.axhline(row["trainer"]["img_s"], color="k", ls="--", label=f"trainer ({res['meta']['device']})")
        ax.set_xticks(range(len(values)), labels, fontsize=6, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"R = {row['resolution']}")
        ax.set_ylabel("images / s")
        ax.legend(fontsize=8)
    fig.suptitle(f"cache formats on {res['meta']['filesystem']}, {res['meta']['cpu']}", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = setup_torch(args.device, args.threads)
    out = output_path(args.out, "bench/cache.py", device.type)
    with scratch_dir(args.dir, ".cache-bench-") as work:
        load = LoadWatch()
        steps = len(FORMATS) + 1 + args.train_steps + args.train_warmup  # progress steps per resolution
        with tqdm(total=steps * len(args.resolutions), dynamic_ncols=True) as bar:
            rows = [bench_resolution(args, r, work, device, bar) for r in args.resolutions]
    res = {
        "meta": {**cpu_meta(), "threads": torch.get_num_threads(), "device": str(device),
                 "device_name": device_name(device), "filesystem": mount_of(args.dir), "torch": torch.__version__,
                 **load.meta(args.quick, "bench/cache.py", argv)},
        "config": {"resolutions": args.resolutions, "mib": args.mib, "shard_pairs": args.shard_pairs,
                   "jpeg_quality": args.jpeg_quality, "take_batch": args.take_batch,
                   "train_batch_size": args.train_batch_size, "train_steps": args.train_steps},
        "resolutions": rows,
        "targets": [],  # none: read / trainer says how far the cache is from limiting training
        "summary": {"png_lossless": all(r["webdataset_png"]["lossless"] for r in rows),
                    "raw_exact": all(r["formats"]["raw"]["exact"] for r in rows),
                    **{f"min_{fmt}_read_over_trainer": min(min(v for k, v in r["read_over_trainer"].items()
                                                               if k.startswith(fmt)) for r in rows)
                       for fmt in (*FORMATS, "png")}},
    }
    save_results(res, out, plot, format_report, _T0, started)
    return res


if __name__ == "__main__":
    main()
