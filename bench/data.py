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
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, BenchParser, int_list, output_path, save_results, scratch_dir
from databench.memory import bench_memory
from databench.report import CLASSES, evaluate_targets, format_report, plot
from machine import LoadWatch, cpu_meta, filesystem_type
from photos import photo_folder
from timing import interleaved_medians
from tqdm.auto import tqdm

from onlinemix.data.prepare import Settings, default_workers, prepare
from onlinemix.data.sources import array_source
from onlinemix.data.store import ImageStore

DEFAULTS = {  # (default run, --quick run)
    "images": (1400, 160),
    "batch": (256, 32),
    "batches": (12, 4),
    "large": (100_000, 20_000),
    "large_size": (32, 16),
    "open_repeats": (300, 100),
}


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
    args.readers = int_list(p, "--readers", args.readers)
    if min(args.images, args.batch, args.batches, args.large, args.open_repeats) < 1 or args.size < 8 \
            or args.large_size < 8 or args.loader_workers < 0 or args.prepare_workers < 1 or args.chunk_images < 1:
        p.error("counts must be >= 1, sizes >= 8, --loader-workers >= 0")
    return args


# ----------------------------------------------------------------------------- parts

def timed_prepare(source: str, out: Path, settings: Settings, workers: int) -> dict:
    """``prepare`` of ``source`` into a store at ``out``, timed: images/s in all and per worker."""
    t0 = time.perf_counter()
    result = prepare(source, out, settings, workers, progress=False)
    seconds = time.perf_counter() - t0
    return {"workers": workers, "seconds": seconds, "img_s": result.images / seconds,
            "img_s_per_worker": result.images / seconds / workers, "images": result.images,
            "data_bytes": result.data_bytes}


def bench_prepare(args: argparse.Namespace, photos: Path, work: Path) -> dict:
    """The photos into a RAW store with one worker and with all, and into a JPEG store; whether both RAW
    stores are the same bytes."""
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


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    out = output_path(args.out, "bench/data.py")
    parts = ["photos", "prepare", "read vs memcpy", "read vs ImageFolder", "opening", "memory"]
    with scratch_dir(args.dir, ".data-bench-") as work, tqdm(parts, dynamic_ncols=True, file=sys.stderr) as bar:
        load = LoadWatch()
        bar.set_description("photos")
        photos = photo_folder(work / "photos", args.images, CLASSES)
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
        memory = bench_memory(args.readers, ImageStore.open(work / "raw"))
        bar.update()
    res = {
        "meta": {**cpu_meta(), "threads": torch.get_num_threads(), "filesystem": filesystem_type(args.dir),
                 "torch": torch.__version__, **load.meta(args.quick, "bench/data.py", argv)},
        "config": {k: getattr(args, k) for k in ("images", "size", "batch", "batches", "loader_workers",
                                                 "prepare_workers", "chunk_images", "large", "large_size",
                                                 "open_repeats", "readers")},
        "prepare": prepared, "memcpy": memcpy, "loaders": loaders, "open": opening,
        "memory": memory,
    }
    res["targets"] = evaluate_targets(res)
    save_results(res, out, plot, format_report, _T0, started)
    return res


if __name__ == "__main__":
    main()
