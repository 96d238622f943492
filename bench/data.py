"""The prepared image store (``onlinemix.data.store``) against the ways of reading images it replaces,
measured side by side in one run.

    python bench/data.py                  # 1,400 photo JPEGs at 224 px, a 100k-image store: a few minutes
    python bench/data.py --quick          # well under a minute; tests/test_bench_data.py runs it
    python bench/data.py --help           # every flag

Source images: ImageNet-shaped JPEGs (333-500 x 250-375 px, quality 90) cut from a photograph
(matplotlib's sample Grace Hopper) in an ImageFolder tree of 10 classes. Parts, each timed here:

* **prepare**: ``python -m onlinemix.data prepare``'s work (``prepare.prepare``) into a RAW store
  with one worker and with ``--prepare-workers`` (the worker pool's start included), and into a
  JPEG store; whether both RAW stores are the same bytes;
* **read vs memcpy**: random batches by id, ``ImageStore.read(ids, out=buffer)`` from a RAW store
  in the page cache, against ``np.copyto`` of the same number of bytes between two arrays in RAM,
  and against indexing an in-RAM uint8 tensor (what ``onlinemix.data`` users do today), one thread;
* **read vs ImageFolder**: the same ``DataLoader`` (``--loader-workers`` workers, random batches)
  over the RAW store (``read``), the JPEG store (``read``: decode and square) and torchvision's
  ``ImageFolder`` with PIL decode + ``RandomResizedCrop(S)``: images/s per worker (core);
* **opening**: ``ImageStore.open`` + ``len`` + ``classes`` + the first image, for the photo store
  and for a synthetic RAW store of ``--large`` images at ``--large-size`` px (median of many),
  with the files opened and bytes read while opening;
* **memory**: 1, 2 and 4 processes (spawned, the store pickled to them) each read every image of
  the RAW store into a reused buffer; from ``/proc/<pid>/smaps``: the Pss of their mappings of the
  store's files (shared pages count once, split between the processes) plus their anonymous growth.

On the CPU torch runs one thread (per-core rates, as the other bench scripts).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import (
    RESULTS_DIR,
    BenchParser,
    cpu_name,
    cpu_snapshot,
    import_pyplot,
    int_list,
    load_line,
    other_cores_since,
    results_path,
    run_meta,
    save_figure,
    save_results,
    target,
    target_line,
)
from PIL import Image
from tqdm.auto import tqdm

from onlinemix.data.prepare import Settings, default_workers, prepare
from onlinemix.data.sources import array_source
from onlinemix.data.store import ImageStore

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = {  # (default run, --quick run)
    "images": (1400, 160),
    "batch": (256, 32),
    "batches": (12, 4),
    "large": (100_000, 20_000),
    "large_size": (32, 16),
    "open_repeats": (300, 100),
}
TARGETS = {"read_over_memcpy": 0.5, "raw_over_imagefolder": 10.0, "open_spread": 0.10, "open_s": 1.0,
           "memory_over_store": 1.1}
CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/data.py",
        description="Prepare, read, open and share a memory-mapped image store; compare with memcpy, an in-RAM "
                    "tensor and torchvision ImageFolder + DataLoader on the same JPEGs.",
        epilog="Flags left out take the default run's value, or the --quick value with --quick. "
               "Results: a table on stdout, JSON at --out and a PNG plot next to it.",
        defaults=DEFAULTS, quick_help="160 images, small batches, a 20k-image store")
    q = p.default_note
    p.add_argument("--images", type=int, default=None, help=f"photo JPEGs in the ImageFolder tree {q('images')}")
    p.add_argument("--size", type=int, default=224, help="store size S and crop size (default 224)")
    p.add_argument("--batch", type=int, default=None, help=f"images per random batch {q('batch')}")
    p.add_argument("--batches", type=int, default=None, help=f"timed batches per reading path {q('batches')}")
    p.add_argument("--loader-workers", type=int, default=1,
                   help="DataLoader workers of every read-vs-ImageFolder path (default 1: rates per core)")
    p.add_argument("--prepare-workers", type=int, default=default_workers(),
                   help="workers of the all-workers prepare (default: all cores)")
    p.add_argument("--chunk-images", type=int, default=64,
                   help="images per chunk of the photo stores (default 64, so that a few hundred images still "
                        "make work for every worker; prepare's own default is 128 MiB of pixels)")
    p.add_argument("--large", type=int, default=None, help=f"images of the synthetic store opened {q('large')}")
    p.add_argument("--large-size", type=int, default=None, help=f"its size S {q('large_size')}")
    p.add_argument("--open-repeats", type=int, default=None, help=f"timed opens per store {q('open_repeats')}")
    p.add_argument("--readers", default="1,2,4", help="reading process counts of the memory part (default 1,2,4)")
    p.add_argument("--dir", type=Path, default=RESULTS_DIR,
                   help="where the temporary images and stores go (removed afterwards; default bench/results)")
    args = p.parse(argv)
    args.out = results_path(args.out, "bench/data.py")
    args.readers = int_list(p, "--readers", args.readers)
    if min(args.images, args.batch, args.batches, args.large, args.open_repeats) < 1 or args.size < 8 \
            or args.large_size < 8 or args.loader_workers < 0 or args.prepare_workers < 1 or args.chunk_images < 1:
        p.error("counts must be >= 1, sizes >= 8, --loader-workers >= 0")
    return args


# ----------------------------------------------------------------------------- source images

def photo_folder(root: Path, n: int, seed: int = 0) -> Path:
    """ImageNet-shaped JPEGs: random crops of a photograph, 333-500 x 250-375 px, quality 90."""
    import matplotlib.cbook as cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as img:
        photo = img.convert("RGB")
    rng = np.random.default_rng(seed)
    w, h = photo.size
    for i in range(n):
        cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(333, 501)), int(rng.integers(250, 376)))
        crop = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        (root / f"class{i % CLASSES:02d}").mkdir(parents=True, exist_ok=True)
        crop.save(root / f"class{i % CLASSES:02d}" / f"{i:06d}.jpg", quality=90)
    return root


# ----------------------------------------------------------------------------- parts

def timed_prepare(source, out: Path, settings: Settings, workers: int) -> dict:
    t0 = time.perf_counter()
    result = prepare(source, out, settings, workers, progress=False)
    seconds = time.perf_counter() - t0
    return {"workers": workers, "seconds": seconds, "img_s": result.images / seconds,
            "img_s_per_worker": result.images / seconds / workers, "images": result.images,
            "data_bytes": result.data_bytes}


def bench_prepare(args: argparse.Namespace, photos: Path, work: Path) -> dict:
    raw = Settings(size=args.size, chunk_images=args.chunk_images)
    one = timed_prepare(str(photos), work / "raw-1", raw, 1)
    every = timed_prepare(str(photos), work / "raw", raw, args.prepare_workers)
    jpeg = timed_prepare(str(photos), work / "jpeg", Settings(size=args.size, format="jpeg",
                                                              chunk_images=args.chunk_images), args.prepare_workers)
    same = all((work / "raw-1" / f).read_bytes() == (work / "raw" / f).read_bytes()
               for f in ("chunks.npy", "index.npy", "labels.npy", "store.json"))
    shutil.rmtree(work / "raw-1")
    return {"raw_one_worker": one, "raw_all_workers": every, "jpeg_all_workers": jpeg,
            "same_bytes_any_worker_count": same,
            "jpeg_bytes_per_image": jpeg["data_bytes"] / jpeg["images"],
            "raw_bytes_per_image": every["data_bytes"] / every["images"]}


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, timed in turns (a, b, c, a, b, c, ...) so that a change in the
    background load hits every one of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_memcpy(args: argparse.Namespace, store: ImageStore) -> dict:
    """One thread, warm pages: a store read by id vs a memcpy of the same bytes vs an in-RAM tensor gather."""
    n, b = len(store), min(args.batch, len(store))
    in_ram = store.read(range(n))  # also brings every page into this process's mapping
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, n, b)) for _ in range(max(args.batches, 20))]
    out = torch.empty((b, 3, store.size, store.size), dtype=torch.uint8)
    src, dst = in_ram[:b].numpy().copy(), np.empty_like(in_ram[:b].numpy())
    reads, gathers = iter(batches * 3), iter(batches * 3)
    seconds = interleaved_medians({"read": lambda: store.read(next(reads), out=out),
                                   "copy": lambda: np.copyto(dst, src),
                                   "gather": lambda: torch.index_select(in_ram, 0, next(gathers), out=out)},
                                  len(batches) * 3)
    read, copy, gather = seconds["read"], seconds["copy"], seconds["gather"]
    batch_bytes = out.numel()
    return {"batch": b, "batch_bytes": batch_bytes,
            "store_read_img_s": b / read, "memcpy_img_s": b / copy, "ram_tensor_gather_img_s": b / gather,
            "store_read_gb_s": batch_bytes / read / 1e9, "memcpy_gb_s": batch_bytes / copy / 1e9,
            "read_over_memcpy": copy / read, "read_over_ram_gather": gather / read}


class StoreBatches(torch.utils.data.Dataset):
    """Item i is the batch ``store.read(batches[i])``: a DataLoader worker reads a whole batch by id."""

    def __init__(self, store: ImageStore, batches: list[np.ndarray]) -> None:
        self.store, self.batches = store, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store.read(self.batches[i])


def loader_rate(loader: torch.utils.data.DataLoader) -> float:
    """Images per second after the first batch (workers started, first batch made)."""
    it = iter(loader)
    next(it)
    t0, images = time.perf_counter(), 0
    for batch in it:
        images += len(batch[0] if isinstance(batch, (list, tuple)) else batch)
    return images / (time.perf_counter() - t0)


def bench_loaders(args: argparse.Namespace, photos: Path, raw: ImageStore, jpeg: ImageStore) -> dict:
    """Images/s per core: the stores read in the consuming process (no worker, no IPC: how a trainer reads
    a shared store) and through a DataLoader, against ImageFolder + DataLoader with the same workers."""
    from torchvision import datasets, transforms

    n, b, w = len(raw), args.batch, args.loader_workers
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, n, b) for _ in range(args.batches + 1)]
    out, raw_ids, jpeg_ids = torch.empty((b, 3, args.size, args.size), dtype=torch.uint8), iter(batches), iter(batches)
    seconds = interleaved_medians({"raw_store": lambda: raw.read(next(raw_ids), out=out),
                                   "jpeg_store": lambda: jpeg.read(next(jpeg_ids), out=out)}, len(batches))
    in_process = {name: b / t for name, t in seconds.items()}
    through_loader = {name: loader_rate(torch.utils.data.DataLoader(StoreBatches(store, batches), batch_size=None,
                                                                    num_workers=w))
                      for name, store in (("raw_store", raw), ("jpeg_store", jpeg))}
    folder = datasets.ImageFolder(str(photos), transform=transforms.Compose(
        [transforms.RandomResizedCrop(args.size), transforms.PILToTensor()]))
    sampler = torch.utils.data.RandomSampler(folder, replacement=True, num_samples=b * (args.batches + 1))
    through_loader["imagefolder"] = loader_rate(torch.utils.data.DataLoader(folder, batch_size=b, sampler=sampler,
                                                                            num_workers=w))
    per_core = {k: v / max(1, w) for k, v in through_loader.items()}
    return {"workers": w, "batch": b, "in_process_img_s": in_process, "dataloader_img_s_per_core": per_core,
            "raw_over_imagefolder": in_process["raw_store"] / per_core["imagefolder"],
            "jpeg_over_imagefolder": in_process["jpeg_store"] / per_core["imagefolder"],
            "dataloader_raw_over_imagefolder": per_core["raw_store"] / per_core["imagefolder"],
            "dataloader_jpeg_over_imagefolder": per_core["jpeg_store"] / per_core["imagefolder"]}


def opening_work(root: Path) -> dict:
    """Files opened and bytes read by ``ImageStore.open`` + len + classes (not the first image)."""
    events: list[str] = []
    recording = [False]
    sys.addaudithook(lambda event, a: recording[0] and event == "open" and events.append(str(a[0])))
    io_before = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    recording[0] = True
    store = ImageStore.open(root)
    len(store), store.classes
    recording[0] = False
    io_after = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"files_opened": len(events), "bytes_read": int(io_after["rchar"]) - int(io_before["rchar"])}


def synthetic_store(root: Path, images: int, size: int) -> float:
    """A RAW store of random pixels; returns the seconds prepare took."""
    pixels = np.random.default_rng(images).integers(0, 256, (images, 3, size, size), dtype=np.uint8)
    source = array_source("synthetic", pixels, np.arange(images) % CLASSES, [f"class{c:02d}" for c in range(CLASSES)],
                          f"random-{images}-{size}")
    t0 = time.perf_counter()
    prepare(source, root, Settings(size=size), workers=1, progress=False)
    return time.perf_counter() - t0


def bench_open(args: argparse.Namespace, work: Path) -> dict:
    """Start-up of two synthetic RAW stores at the same size that differ only in their image count;
    timed alternately, so a change in background load hits both."""
    roots = {"small": work / "open-small", "large": work / "open-large"}
    build_s = {name: synthetic_store(root, n, args.large_size)
               for (name, root), n in zip(roots.items(), (args.images, args.large))}

    def start(root: Path) -> None:
        store = ImageStore.open(root)
        len(store), store.classes
        store.read([0])

    for root in roots.values():
        start(root)  # the tables' and first image's pages into the page cache, as for any later start
    seconds = interleaved_medians({name: lambda root=root: start(root) for name, root in roots.items()},
                                  args.open_repeats)
    rows = {name: {"images": len(ImageStore.open(root)), "size": args.large_size, "build_s": build_s[name],
                   "startup_s": seconds[name], **opening_work(root)}
            for name, root in roots.items()}
    for root in roots.values():
        shutil.rmtree(root)
    return {**rows, "large_over_small": rows["large"]["startup_s"] / rows["small"]["startup_s"]}


READER = """
import pickle, sys
import torch
from pathlib import Path
def anonymous_kib():
    return int(next(l for l in Path("/proc/self/smaps_rollup").read_text().splitlines()
                    if l.startswith("Anonymous:")).split()[1])
store = pickle.loads(bytes.fromhex(sys.argv[1]))
batch = torch.zeros((64, 3, store.size, store.size), dtype=torch.uint8)  # the batch buffer, touched already
store.read(range(1), out=batch[:1])
before = anonymous_kib()
for start in range(0, len(store), 64):
    store.read(range(start, min(start + 64, len(store))), out=batch[:min(64, len(store) - start)])
print(anonymous_kib() - before, flush=True)
sys.stdin.readline()
"""


def mapped_bytes(pid: int, root: Path) -> dict[str, int]:
    """Rss and Pss of a process's mappings of files under ``root``, from /proc/<pid>/smaps."""
    totals, inside = {"Rss": 0, "Pss": 0}, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:
            inside = len(fields) >= 6 and fields[5].startswith(str(root))
        elif inside and fields[0].rstrip(":") in totals:
            totals[fields[0].rstrip(":")] += int(fields[1]) * 1024
    return totals


def bench_memory(args: argparse.Namespace, store: ImageStore) -> dict:
    data = store.header["data_bytes"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for k in args.readers:
        readers = [subprocess.Popen([sys.executable, "-c", READER, pickle.dumps(store).hex()], cwd=REPO, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        try:
            anonymous = [int(r.stdout.readline()) * 1024 for r in readers]
            maps = [mapped_bytes(r.pid, store.root) for r in readers]
        finally:
            for r in readers:
                r.communicate("\n", timeout=120)
        growth = sum(m["Pss"] for m in maps) + sum(max(0, a) for a in anonymous)
        rows.append({"readers": k, "rss_per_reader": [m["Rss"] for m in maps], "pss_sum": sum(m["Pss"] for m in maps),
                     "anonymous_growth": anonymous, "total_growth": growth, "growth_over_store": growth / data,
                     "private_copies_over_store": float(k)})
    return {"store_bytes": data, "rows": rows}


# ----------------------------------------------------------------------------- output

def evaluate_targets(res: dict) -> list[dict]:
    m, lo, op, mem = res["memcpy"], res["loaders"], res["open"], res["memory"]
    worst_memory = max(mem["rows"], key=lambda r: r["growth_over_store"])
    slowest_open = max(op["large"]["startup_s"], op["small"]["startup_s"])
    return [
        target(f"RAW store read >= {TARGETS['read_over_memcpy']}x a memcpy of the same bytes", m["read_over_memcpy"],
               TARGETS["read_over_memcpy"],
               detail=f"{m['store_read_gb_s']:.2f} vs {m['memcpy_gb_s']:.2f} GB/s, batches of {m['batch']}"),
        target(f"RAW store >= {TARGETS['raw_over_imagefolder']:.0f}x ImageFolder + DataLoader per core",
               lo["raw_over_imagefolder"], TARGETS["raw_over_imagefolder"],
               detail=f"{lo['in_process_img_s']['raw_store']:,.0f} vs {lo['dataloader_img_s_per_core']['imagefolder']:,.0f} "
                      f"img/s per core; JPEG store {lo['jpeg_over_imagefolder']:.2f}x "
                      f"({lo['in_process_img_s']['jpeg_store']:,.0f} img/s per core, no target); through a DataLoader "
                      f"RAW {lo['dataloader_raw_over_imagefolder']:.2f}x, JPEG {lo['dataloader_jpeg_over_imagefolder']:.2f}x"),
        target(f"start-up of {op['large']['images']:,} vs {op['small']['images']:,} images within "
               f"{TARGETS['open_spread']:.0%} (|ratio - 1|)", abs(op["large_over_small"] - 1), TARGETS["open_spread"],
               "<=", f"ratio {op['large_over_small']:.3f}; {1e6 * op['large']['startup_s']:.0f} vs "
                     f"{1e6 * op['small']['startup_s']:.0f} us; opening read {op['large']['bytes_read']} vs "
                     f"{op['small']['bytes_read']} bytes from {op['large']['files_opened']} vs "
                     f"{op['small']['files_opened']} file(s)"),
        target("start-up of the slower store, seconds", slowest_open, TARGETS["open_s"], "<="),
        target(f"memory of {', '.join(str(r['readers']) for r in mem['rows'])} reading processes <= "
               f"{TARGETS['memory_over_store']}x the store", worst_memory["growth_over_store"],
               TARGETS["memory_over_store"], "<=",
               ", ".join(f"{r['readers']}: {r['growth_over_store']:.3f}x" for r in mem["rows"])
               + f" (private copies: {worst_memory['readers']}x)"),
    ]


def format_report(res: dict) -> str:
    m, c = res["meta"], res["config"]
    mc, lo, op, mem, pr = res["memcpy"], res["loaders"], res["open"], res["memory"], res["prepare"]
    gb = 1e9
    lines = [f"machine     {m['cpu']} ({m['cpu_count']} logical cores), torch threads {m['threads']}",
             f"disk        {m['filesystem']}", f"date        {m['date']}", load_line(m), "",
             f"Source: {c['images']} photo JPEGs (333-500 x 250-375 px, q90), {CLASSES} classes; S = {c['size']}",
             "", "Prepare (images/s)",
             f"  raw,  1 worker   {pr['raw_one_worker']['img_s']:>9,.1f}",
             f"  raw,  {pr['raw_all_workers']['workers']} workers  {pr['raw_all_workers']['img_s']:>9,.1f}  "
             f"({pr['raw_all_workers']['img_s_per_worker']:,.1f} per worker, pool start included)",
             f"  jpeg, {pr['jpeg_all_workers']['workers']} workers  {pr['jpeg_all_workers']['img_s']:>9,.1f}",
             f"  bytes per image: raw {pr['raw_bytes_per_image']:,.0f}, jpeg {pr['jpeg_bytes_per_image']:,.0f}; "
             f"same bytes for 1 and {pr['raw_all_workers']['workers']} workers: {pr['same_bytes_any_worker_count']}",
             "", f"Random batches of {mc['batch']} by id, one thread, pages warm",
             f"  {'path':<34}{'img/s':>12}{'GB/s':>8}",
             f"  {'memcpy of the same bytes':<34}{mc['memcpy_img_s']:>12,.0f}{mc['memcpy_gb_s']:>8.2f}",
             f"  {'in-RAM uint8 tensor, index_select':<34}{mc['ram_tensor_gather_img_s']:>12,.0f}"
             f"{mc['batch_bytes'] * mc['ram_tensor_gather_img_s'] / mc['batch'] / gb:>8.2f}",
             f"  {'RAW store read(ids, out=)':<34}{mc['store_read_img_s']:>12,.0f}{mc['store_read_gb_s']:>8.2f}",
             "", f"Random batches of {lo['batch']}, images/s per core: in the reading process | through a DataLoader "
                 f"with {lo['workers']} worker(s)",
             f"  {'RAW store read':<38}{lo['in_process_img_s']['raw_store']:>10,.0f}"
             f"{lo['dataloader_img_s_per_core']['raw_store']:>10,.0f}",
             f"  {'JPEG store read (decode, square)':<38}{lo['in_process_img_s']['jpeg_store']:>10,.0f}"
             f"{lo['dataloader_img_s_per_core']['jpeg_store']:>10,.0f}",
             f"  {'ImageFolder, PIL + RandomResizedCrop':<38}{'':>10}"
             f"{lo['dataloader_img_s_per_core']['imagefolder']:>10,.0f}",
             "", "Start-up: open + len + classes + first image (median)",
             *(f"  {op[k]['images']:>9,} images at {op[k]['size']} px: {1e6 * op[k]['startup_s']:>7.0f} us; opening "
               f"reads {op[k]['bytes_read']} bytes from {op[k]['files_opened']} file(s)" for k in ("small", "large")),
             "", f"Memory: processes each reading all {mem['store_bytes'] / 2**20:,.1f} MiB of the RAW store",
             f"  {'readers':>8}{'Pss sum MiB':>13}{'anon MiB':>10}{'growth / store':>16}{'private copies':>16}",
             *(f"  {r['readers']:>8}{r['pss_sum'] / 2**20:>13.1f}{sum(r['anonymous_growth']) / 2**20:>10.1f}"
               f"{r['growth_over_store']:>15.3f}x{r['private_copies_over_store']:>15.0f}x" for r in mem["rows"]),
             "", "Targets", *(target_line(t) for t in res["targets"]),
             f"  {'no target':<17} prepare rate: raw {pr['raw_one_worker']['img_s']:,.0f} img/s on 1 worker, "
             f"{pr['raw_all_workers']['img_s']:,.0f} on {pr['raw_all_workers']['workers']} "
             f"({pr['raw_all_workers']['img_s_per_worker']:,.0f} per worker); jpeg {pr['jpeg_all_workers']['img_s']:,.0f} "
             f"on {pr['jpeg_all_workers']['workers']}; same bytes for any worker count: "
             f"{pr['same_bytes_any_worker_count']}"]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/data.py")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4), gridspec_kw={"width_ratios": [2.2, 1, 1.2, 1.2]})
    mc, lo, op, mem, pr = res["memcpy"], res["loaders"], res["open"], res["memory"], res["prepare"]
    labels = ["memcpy", "RAM tensor", "RAW store", "JPEG store", "RAW store\nDataLoader", "JPEG store\nDataLoader",
              "ImageFolder\nDataLoader"]
    per_core = lo["dataloader_img_s_per_core"]
    values = [mc["memcpy_img_s"], mc["ram_tensor_gather_img_s"], lo["in_process_img_s"]["raw_store"],
              lo["in_process_img_s"]["jpeg_store"], per_core["raw_store"], per_core["jpeg_store"], per_core["imagefolder"]]
    axes[0].bar(range(len(values)), values, color=["grey", "grey", "C0", "C1", "C0", "C1", "C3"])
    axes[0].set_xticks(range(len(values)), labels, fontsize=7, rotation=25, ha="right")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("images / s per core")
    axes[0].set_title(f"random batches, S = {res['config']['size']}: one thread | DataLoader per worker", fontsize=9)
    axes[1].bar([0, 1], [1e6 * op["small"]["startup_s"], 1e6 * op["large"]["startup_s"]], color="C0")
    axes[1].set_xticks([0, 1], [f"{op['small']['images']:,} images", f"{op['large']['images']:,} images"], fontsize=8)
    axes[1].set_ylabel("start-up, us")
    axes[1].set_title("open + first image", fontsize=9)
    readers = [r["readers"] for r in mem["rows"]]
    axes[2].plot(readers, [r["growth_over_store"] for r in mem["rows"]], "o-", label="store (shared pages)")
    axes[2].plot(readers, readers, "k--", label="a private copy each")
    axes[2].axhline(TARGETS["memory_over_store"], color="C3", lw=0.8, label="target")
    axes[2].set_xlabel("reading processes")
    axes[2].set_ylabel("memory growth / store size")
    axes[2].legend(fontsize=8)
    axes[3].bar([0, 1, 2], [pr["raw_one_worker"]["img_s"], pr["raw_all_workers"]["img_s"], pr["jpeg_all_workers"]["img_s"]],
                color=["C0", "C0", "C1"])
    axes[3].set_xticks([0, 1, 2], ["raw, 1 worker", f"raw, {pr['raw_all_workers']['workers']}",
                                   f"jpeg, {pr['jpeg_all_workers']['workers']}"], fontsize=8)
    axes[3].set_ylabel("images / s")
    axes[3].set_title("prepare", fontsize=9)
    fig.suptitle(f"image store, {res['meta']['cpu']}, {res['meta']['date']}", fontsize=9)
    save_figure(fig, path)


def filesystem(path: Path) -> str:
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    load_before, before = os.getloadavg()[0], cpu_snapshot()
    work = Path(tempfile.mkdtemp(prefix=".data-bench-", dir=args.dir))
    parts = ["photos", "prepare", "read vs memcpy", "read vs ImageFolder", "opening", "memory"]
    try:
        with tqdm(parts, dynamic_ncols=True, file=sys.stderr) as bar:
            bar.set_description("photos")
            photos = photo_folder(work / "photos", args.images)
            bar.update(), bar.set_description("prepare")
            prepared = bench_prepare(args, photos, work)
            raw, jpeg = ImageStore.open(work / "raw"), ImageStore.open(work / "jpeg")
            bar.update(), bar.set_description("read vs memcpy")
            memcpy = bench_memcpy(args, raw)
            bar.update(), bar.set_description("read vs ImageFolder")
            loaders = bench_loaders(args, photos, raw, jpeg)
            bar.update(), bar.set_description("opening")
            opening = bench_open(args, work)
            bar.update(), bar.set_description("memory")
            del raw, jpeg  # unmapped: only the reading processes below map the store
            memory = bench_memory(args, ImageStore.open(work / "raw"))
            bar.update()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {
        "meta": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                 "filesystem": filesystem(args.dir), "torch": torch.__version__,
                 **run_meta(load_before, other_cores_since(before), args.quick, "bench/data.py", argv)},
        "config": {k: getattr(args, k) for k in ("images", "size", "batch", "batches", "loader_workers",
                                                 "prepare_workers", "chunk_images", "large", "large_size",
                                                 "open_repeats", "readers")},
        "prepare": prepared, "memcpy": memcpy, "loaders": loaders, "open": opening,
        "memory": memory,
    }
    res["targets"] = evaluate_targets(res)
    save_results(res, args.out, plot, format_report, _T0, started)
    return res


if __name__ == "__main__":
    main()
