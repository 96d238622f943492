"""Building an image store (``python -m onlinemix.data prepare``): decode once, in parallel, resumably.

Worker processes turn chunks of source images into chunk files (format in ``imagestore.py``).
A chunk is committed atomically: its bytes go to a temporary file, which is fsynced and
renamed into place, and only then is its commit record (labels, lengths, CRC32, skipped
images) written the same way. A prepare killed at any point (Ctrl-C, SIGKILL, a full disk)
leaves whole committed chunks and at most some temporary files, which the next run removes;
it decodes only the chunks without a record. Chunk k's bytes depend only on the source images
of chunk k, so the store is the same, byte for byte, whatever the worker count and however
often it was interrupted. The header ``store.json`` is written last, after the tables built
from the commit records, so an unfinished store is never taken for a finished one.

Bad images (corrupt, truncated, empty, not images, decompression bombs) are skipped with one
line each, listed in the store's ``skipped.txt`` and counted in its header.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import io
import json
import math
import multiprocessing as mp
import os
import signal
import struct
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from isal.isal_zlib import crc32
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from onlinemix.core.files import unwritable_reason, write_atomically
from onlinemix.data.decode import DataError, _to_rgb_tensor, to_rgb
from onlinemix.data.sources import ChunkTask, Source, SourceImage, open_source
from onlinemix.data.store import (
    CHUNK_TABLE,
    CHUNKS_DIR,
    COMMITS_DIR,
    FORMAT_VERSION,
    FORMATS,
    INDEX_FILE,
    LABELS_FILE,
    PREPARE_FILE,
    SKIPPED_FILE,
    STORE_FILE,
    chunk_path,
    commit_path,
    resume_command,
)

DEFAULT_SIZE = 224
DEFAULT_QUALITY = 90
CHUNK_BYTES = 128 << 20  # raw bytes per chunk: the work a kill can lose, and a worker's buffer
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
PR_SET_PDEATHSIG = 1
# What Pillow raises for files it cannot decode (truncated, corrupt, not an image, a bomb).
UNDECODABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class PrepareError(RuntimeError):
    """The store cannot be prepared (or resumed) as asked."""


class PrepareBusy(PrepareError):
    """Another process is preparing the same store right now."""


class DiskFull(PrepareError):
    """The disk (or quota, or file-size limit) ran out while writing; committed chunks are kept."""


class Interrupted(Exception):
    """A worker was asked to stop (Ctrl-C) in the middle of a chunk."""


@dataclass(frozen=True)
class Settings:
    """What decides the bytes of a store; a resumed prepare must use the same."""

    size: int = DEFAULT_SIZE
    format: str = "raw"
    quality: int = DEFAULT_QUALITY
    chunk_images: int = 0  # 0: CHUNK_BYTES of raw pixels
    max_pixels: int = MAX_PIXELS

    def resolved(self) -> Settings:
        if self.format not in FORMATS:
            raise PrepareError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.size < 8 or not 1 <= self.quality <= 100 or self.chunk_images < 0 or self.max_pixels < 1:
            raise PrepareError("--size must be >= 8, --quality in 1..100, --chunk-images >= 0, --max-pixels >= 1")
        chunk_images = self.chunk_images or max(1, CHUNK_BYTES // (3 * self.size * self.size))
        return Settings(self.size, self.format, self.quality, chunk_images, self.max_pixels)


@dataclass
class ChunkResult:
    index: int
    items: int
    images: int
    skipped: list[tuple[str, str]]


@dataclass
class PrepareResult:
    root: Path
    images: int
    skipped: int
    chunks: int
    chunks_built: int           # decoded by this run
    chunks_already: int         # committed by an earlier, interrupted run
    data_bytes: int
    already_complete: bool = False


# ----------------------------------------------------------------------------- one image

def capped(img: Image.Image, size: int) -> Image.Image:
    """The image with its longer side at most ``size``, aspect kept (bicubic, antialiased)."""
    w, h = img.size
    if max(w, h) <= size:
        return img
    scale = size / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def open_image(image: SourceImage, max_pixels: int) -> Image.Image:
    """The decoded source image; refuses one over ``max_pixels`` before decoding its pixels."""
    if isinstance(image.data, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image.data.transpose(1, 2, 0)))
    if isinstance(image.data, str) and os.stat(image.data).st_size == 0:
        raise ValueError("empty file (0 bytes)")
    img = Image.open(image.data if isinstance(image.data, str) else io.BytesIO(image.data))
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise Image.DecompressionBombError(f"decompression bomb: {w} x {h} = {w * h} pixels, over the limit of "
                                           f"{max_pixels} (--max-pixels)")
    img.load()
    return img


def encode(image: SourceImage, settings: Settings) -> bytes:
    """The stored bytes of one image: raw (3, S, S) pixels, or a JPEG with the longer side capped at S."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's note on palette transparency
        with open_image(image, settings.max_pixels) as img:
            if settings.format == "raw":
                return _to_rgb_tensor(img, settings.size, image.name).numpy().tobytes()
            out = io.BytesIO()
            capped(to_rgb(img), settings.size).save(out, format="JPEG", quality=settings.quality)
            return out.getvalue()


def reason(e: BaseException) -> str:
    """One readable line for why an image could not be decoded."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    if "truncated" in str(e):
        return f"truncated ({e})"
    if isinstance(e, (Image.DecompressionBombError, ValueError)):
        return str(e)
    return f"{e.__class__.__name__}: {e}"


# ----------------------------------------------------------------------------- one chunk

def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_parts_atomically(path: Path, parts: list[bytes]) -> None:
    """``parts`` to ``path`` through :func:`onlinemix.core.files.write_atomically`; a full disk raises
    DiskFull, nothing of the file kept."""
    try:
        write_atomically(path, lambda f: f.writelines(parts))
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise DiskFull(f"the disk is full ({e.strerror}) while writing {path}; nothing of it was kept: free "
                           f"space and run the same command again to resume") from None
        raise


_interrupted = False


def _stop_soon(*_: Any) -> None:
    global _interrupted
    _interrupted = True


def init_worker() -> None:
    """Die with the parent, even a SIGKILLed one (Linux), and stop at the next image on Ctrl-C."""
    signal.signal(signal.SIGINT, _stop_soon)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def build_chunk(root: Path, settings: Settings, task: ChunkTask) -> ChunkResult:
    """Encode a chunk's images and commit it: chunk file, then its commit record."""
    parts, labels, skipped = [], [], []
    for image in task.images:
        if _interrupted:
            raise Interrupted()
        try:
            if image.problem:
                raise ValueError(image.problem)
            parts.append(encode(image, settings))
            labels.append(image.label)
        except UNDECODABLE as e:
            skipped.append((image.name, reason(e)))
    checksum = 0
    for part in parts:
        checksum = crc32(part, checksum)
    lengths = [len(p) for p in parts]
    record = {"chunk": task.index, "items": len(task.images), "images": len(parts), "bytes": sum(lengths),
              "crc32": checksum, "labels": labels, "lengths": lengths, "skipped": skipped}
    write_parts_atomically(chunk_path(root, task.index), parts)
    write_parts_atomically(commit_path(root, task.index), [json.dumps(record).encode()])
    return ChunkResult(task.index, len(task.images), len(parts), skipped)


def pool_start_method() -> str:
    """fork where it is safe (Linux, in a process that has not started CUDA or a process group): workers start
    at once and run only Pillow and numpy. A training run prepares its store after CUDA and NCCL are up, and a
    forked child of those can deadlock on locks their threads held: spawn there."""
    torch = sys.modules.get("torch")  # not imported: nothing of it started
    started = torch is not None and (torch.cuda.is_initialized() or (torch.distributed.is_available()
                                                                     and torch.distributed.is_initialized()))
    return "fork" if sys.platform == "linux" and not started else "spawn"


def run_chunks(tasks: Iterator[ChunkTask], root: Path, settings: Settings, workers: int) -> Iterator[ChunkResult]:
    """Build every task's chunk, in this process (``workers == 1``) or in a pool, yielding each result.
    At most two chunks per worker wait in the pool, so a streamed source never piles up in memory."""
    if workers == 1:
        for task in tasks:
            yield build_chunk(root, settings, task)
        return
    context = mp.get_context(pool_start_method())
    gc.freeze()  # frozen objects are skipped by the garbage collector: forked children never copy the source listing
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker) as pool:
        pending: set[Future] = set()
        try:
            for task in tasks:
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
                pending.add(pool.submit(build_chunk, root, settings, task))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
        except BrokenProcessPool as e:
            raise PrepareError("a prepare worker died (out of memory?); the chunks committed so far are kept: "
                               "run the same command again to resume") from e
        finally:
            for f in pending:
                f.cancel()
            gc.unfreeze()


# ----------------------------------------------------------------------------- the store's state

def committed_chunks(root: Path) -> dict[int, dict[str, Any]]:
    """The commit records whose chunk file is present at its recorded size (a record without its
    chunk, e.g. a chunk deleted by hand, is removed so the chunk is built again)."""
    records = {}
    for path in sorted((root / COMMITS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            ok = chunk_path(root, record["chunk"]).stat().st_size == record["bytes"]
        except (OSError, ValueError, KeyError):
            ok = False
        if ok:
            records[record["chunk"]] = record
        else:
            path.unlink()
    return records


def remove_temporaries(root: Path) -> None:
    """Half-written files of a killed run (``.*.tmp``); never committed, never read."""
    for directory in (root, root / CHUNKS_DIR, root / COMMITS_DIR):
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def lock(root: Path) -> int:
    """An exclusive lock on the store directory for this prepare (released by the kernel if it dies)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PrepareBusy(f"another prepare is writing {root}; wait for it to finish") from None
    return fd


def start(root: Path, plan: dict[str, Any]) -> None:
    """Create the store directory with its ``prepare.json``, or check that an existing one was started
    with the same settings and source (else resuming would mix two stores)."""
    if root.exists() and not (root / PREPARE_FILE).exists() and any(root.iterdir()):
        raise PrepareError(f"--out {root} exists and is not an image store; choose a new directory")
    (root / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    (root / COMMITS_DIR).mkdir(exist_ok=True)
    if (root / PREPARE_FILE).exists():
        started = json.loads((root / PREPARE_FILE).read_text())
        if started != plan:
            raise PrepareError(f"{root} was started by `{resume_command(root, started)}` (source digest "
                               f"{started['source']['digest']}); this command asks for `{resume_command(root, plan)}` "
                               f"(source digest {plan['source']['digest']}): use a new --out, or the same command "
                               f"and unchanged source to resume")
    else:
        write_parts_atomically(root / PREPARE_FILE, [json.dumps(plan, indent=2).encode()])


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def finalize(root: Path, source: Source, settings: Settings, n_chunks: int) -> dict[str, Any]:
    """Tables from the commit records, then ``store.json`` last: the store is complete."""
    records = [json.loads(commit_path(root, k).read_text()) for k in range(n_chunks)]
    labels = np.array([label for r in records for label in r["labels"]], dtype=np.int64)
    index = np.array([(r["chunk"], offset, length) for r in records
                      for offset, length in zip(np.cumsum([0, *r["lengths"][:-1]]).tolist(), r["lengths"])],
                     dtype=np.int64).reshape(-1, 3)
    skipped = source.problems + [tuple(s) for r in records for s in r["skipped"]]
    write_parts_atomically(root / SKIPPED_FILE, [f"{name}\t{why}\n".encode() for name, why in skipped])
    if not len(labels):
        raise PrepareError(f"no readable images in {source.path}; see {root / SKIPPED_FILE}")
    classes = source.classes or [str(c) for c in range(int(labels.max()) + 1)]
    header = {"format_version": FORMAT_VERSION, "format": settings.format, "size": settings.size,
              "quality": settings.quality if settings.format == "jpeg" else None, "images": len(labels),
              "skipped": len(skipped), "chunks": n_chunks, "chunk_images": settings.chunk_images,
              "data_bytes": int(sum(r["bytes"] for r in records)), "max_pixels": settings.max_pixels,
              "classes": classes, "source": source.description()}
    for name, array in ((LABELS_FILE, labels), (INDEX_FILE, index), (CHUNK_TABLE, np.array(
            [(r["images"], r["bytes"], r["crc32"]) for r in records], dtype=np.int64).reshape(-1, 3))):
        write_parts_atomically(root / name, [npy_bytes(array)])
    write_parts_atomically(root / STORE_FILE, [json.dumps(header, indent=2).encode()])
    return header


# ----------------------------------------------------------------------------- the command

def prepare(source: str | Source, out: Path, settings: Settings, workers: int, classes_file: Path | None = None,
            progress: bool = True) -> PrepareResult:
    """Build (or resume, or confirm) the store of ``source`` (a SRC argument, or a listed Source) at ``out``."""
    settings = settings.resolved()
    if workers < 1:
        raise PrepareError("--workers must be >= 1")
    problem = unwritable_reason(out)
    if problem:
        raise PrepareError(f"--out {out} cannot hold a store ({problem}); give a directory")
    if isinstance(source, str):
        try:
            source = open_source(source, settings.size, classes_file)
        except DataError as e:
            raise PrepareError(str(e)) from e
    plan = {"format_version": FORMAT_VERSION, "settings": {**asdict(settings), "classes": classes_file and
                                                           str(classes_file.resolve())},
            "source": source.description()}
    out.mkdir(parents=True, exist_ok=True)
    fd = lock(out)
    try:
        start(out, plan)
        n_chunks = math.ceil(source.total / settings.chunk_images)
        if (out / STORE_FILE).exists():
            header = json.loads((out / STORE_FILE).read_text())
            return PrepareResult(out, header["images"], header["skipped"], n_chunks, 0, n_chunks,
                                 header["data_bytes"], already_complete=True)
        remove_temporaries(out)
        done = committed_chunks(out)
        for name, why in source.problems:
            tqdm.write(f"skipped {name}: {why}", file=sys.stderr)
        built = 0
        bar = tqdm(total=source.total, initial=sum(r["items"] for r in done.values()), unit="img", disable=not progress,
                   desc=f"prepare {settings.format} {settings.size}px", dynamic_ncols=True, file=sys.stderr)
        results = run_chunks(source.chunks(settings.chunk_images, set(done)), out, settings, workers)
        try:
            with closing(results):  # the pool is shut down before the temporaries are removed
                for result in results:
                    for name, why in result.skipped:
                        tqdm.write(f"skipped {name}: {why}", file=sys.stderr)
                    built += 1
                    bar.update(result.items)
        except DataError as e:
            raise PrepareError(str(e)) from e
        finally:
            bar.close()
            remove_temporaries(out)
        header = finalize(out, source, settings, n_chunks)
        return PrepareResult(out, header["images"], header["skipped"], n_chunks, built, len(done),
                             header["data_bytes"])
    finally:
        os.close(fd)
