"""Prepared, memory-mapped image store: every process on a node reads the same pages.

Decoding a dataset into each process's memory costs one copy per process (ImageNet-1K at
224 px is 193 GB) and an hour of decoding each time. A store is decoded once, by
``python -m onlinemix.data prepare`` (``onlinemix/data/prepare.py``), into files that readers map
read-only: the OS page cache holds one copy however many trainers, producers and DataLoader
workers read it, and opening one costs the same for 1k images as for 1M.

Layout of a store directory (format version 1)::

    store.json          the header, written last: its presence means the store is complete.
                        format_version, format (raw | jpeg), size S, quality (jpeg), images N,
                        skipped, chunks C, chunk_images, data_bytes, max_pixels, classes,
                        source (what it was prepared from)
    chunks.npy          int64 (C, 3): images, bytes and CRC32 of each chunk file
    index.npy           int64 (N, 3): chunk, byte offset and byte length of image id
    labels.npy          int64 (N,): the class of image id (an index into ``classes``)
    skipped.txt         one line per source image (or directory) left out, with the reason
    prepare.json        the settings and source of the prepare (compared on resume)
    chunks/NNNNNN.bin   image bytes, packed; each file starts on a page boundary (its own file)
    commits/NNNNNN.json commit record of chunk NNNNNN: its images, bytes, CRC32, labels, skips

Chunk k holds the source images k*chunk_images .. (k+1)*chunk_images-1, minus skipped ones;
ids number the kept images in source order. Per format:

* ``raw``: uint8 (3, S, S) per image, C-order: the short side resized to S (PIL bicubic,
  antialiased) and centre-cropped, as ``onlinemix.data`` decodes images for training. A read
  is one gather copy.
* ``jpeg``: a baseline JPEG per image (PIL, quality ``quality``), RGB, the longer side capped
  at S with the aspect kept; decoded by ``torchvision.io.decode_jpeg`` in batches (on a GPU
  when one is given). ``read`` squares them the way ``raw`` is squared; ``read_variable``
  returns them at their stored shape, for crops that want the original aspect.

The page-aligned, fixed-size-metadata design follows FFCV's ``.beton`` (one file: header,
per-sample metadata table, data pages, allocation table); the store instead commits
chunk files atomically, so a killed prepare resumes without redoing committed work, and keeps
its tables as ``.npy`` files mapped on first use, so opening reads only the small header.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from isal.isal_zlib import crc32

from onlinemix.core.errors import UserError
from onlinemix.data.decode import square_geometry

FORMAT_VERSION = 1
FORMATS = ("raw", "jpeg")
STORE_FILE, PREPARE_FILE = "store.json", "prepare.json"
CHUNK_TABLE, INDEX_FILE, LABELS_FILE, SKIPPED_FILE = "chunks.npy", "index.npy", "labels.npy", "skipped.txt"
CHUNKS_DIR, COMMITS_DIR = "chunks", "commits"
PREPARE_COMMAND = "python -m onlinemix.data prepare"
VERIFY_BLOCK = 16 << 20  # bytes read at a time by verify


class StoreError(UserError, RuntimeError):
    """The image store is missing, incomplete, damaged, too new or unsuitable."""


def chunk_path(root: Path, chunk: int) -> Path:
    return root / CHUNKS_DIR / f"{chunk:06d}.bin"


def commit_path(root: Path, chunk: int) -> Path:
    return root / COMMITS_DIR / f"{chunk:06d}.json"


def is_image_store(path: str | Path) -> bool:
    """Whether ``path`` is a store directory, complete or not (so a dataset path can be told apart)."""
    path = Path(path)
    return (path / STORE_FILE).is_file() or (path / PREPARE_FILE).is_file()


def resume_command(root: Path, prepare: dict[str, Any]) -> str:
    """The prepare command that continues the store at ``root`` (from its ``prepare.json``)."""
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in prepare["settings"].items()
                     if value is not None)
    return f"{PREPARE_COMMAND} {prepare['source']['path']} --out {root} {flags}"


def read_header(root: Path) -> dict[str, Any]:
    """The parsed ``store.json`` of a complete store whose version this code reads, else StoreError."""
    try:
        header = json.loads((root / STORE_FILE).read_text())
    except FileNotFoundError:
        if (root / PREPARE_FILE).is_file():
            done = len(list((root / COMMITS_DIR).glob("*.json")))
            command = resume_command(root, json.loads((root / PREPARE_FILE).read_text()))
            raise StoreError(f"image store {root} is incomplete ({done} chunk(s) committed); "
                             f"run prepare again to resume: {command}") from None
        if not root.exists():
            raise StoreError(f"image store {root} does not exist") from None
        raise StoreError(f"{root} is not an image store (no {STORE_FILE}); "
                         f"make one with {PREPARE_COMMAND} SRC --out {root}") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {root / STORE_FILE}: {e}") from e
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(f"image store {root} has format version {version}, newer than the version this "
                         f"onlinemix reads ({FORMAT_VERSION}): upgrade onlinemix, or prepare the store again "
                         f"with this one")
    return header


def square(image: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 (3, H, W) image as (3, size, size): short side to ``size`` (bilinear, antialiased), centre crop."""
    from torchvision.transforms.v2 import InterpolationMode  # JPEG stores only: RAW readers skip the import
    from torchvision.transforms.v2 import functional as TF

    height, width = image.shape[-2:]
    new_w, new_h, left, top = square_geometry(width, height, size)
    if (new_w, new_h) != (width, height):
        image = TF.resize(image, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return image[:, top:top + size, left:left + size]


def check_resolution(store: ImageStore, resolution: int) -> None:
    """Refuse a store whose images are smaller than the training resolution (upsampling would
    silently blur every image); the message gives the prepare command that fixes it."""
    if store.size < resolution:
        raise StoreError(f"image store {store.root} holds images at {store.size} px, smaller than the training "
                         f"resolution {resolution}: prepare a store with --size {resolution} or more "
                         f"({PREPARE_COMMAND} SRC --out NEW_STORE --size {resolution}), or train at "
                         f"--data.resolution {store.size}")


class ImageStore:
    """Read-only access to a prepared store by image id.

    Nothing but ``store.json`` is read at open; the tables and each chunk file are mapped on
    first use, so opening costs the same whatever the number of images. Pickling sends only
    the path: a spawned producer or DataLoader worker re-opens the store and maps the same pages.
    """

    def __init__(self, root: Path, header: dict[str, Any]) -> None:
        self.root = root
        self.header = header
        self._chunks: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path) -> ImageStore:
        root = Path(path)
        return cls(root, read_header(root))

    def __reduce__(self) -> tuple:
        return ImageStore.open, (str(self.root),)

    def __len__(self) -> int:
        return self.header["images"]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, 3, S, S): the store reads like an in-memory uint8 image tensor of this shape."""
        return (len(self), 3, self.size, self.size)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Tensor-style reads, so code written for an in-memory (N, 3, S, S) uint8 tensor reads the
        store by id instead: an int gives one (3, S, S) image, a slice or ids a (B, 3, S, S) batch."""
        if isinstance(index, slice):
            return self.read(np.arange(len(self))[index])
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.ndim == 0):
            return self.read([int(index)])[0]
        return self.read(index)

    def __repr__(self) -> str:
        return f"ImageStore({str(self.root)!r}: {len(self)} images, {self.format} {self.size} px)"

    @property
    def size(self) -> int:
        return self.header["size"]

    @property
    def format(self) -> str:
        return self.header["format"]

    @property
    def classes(self) -> list[str]:
        return self.header["classes"]

    @cached_property
    def labels(self) -> torch.Tensor:
        """(N,) int64 class of every image."""
        return torch.from_numpy(np.load(self.root / LABELS_FILE))

    @cached_property
    def _chunk_table(self) -> list[tuple[int, int, int]]:
        """(images, bytes, CRC32) of every chunk file."""
        return [tuple(row) for row in np.load(self.root / CHUNK_TABLE).tolist()]

    @cached_property
    def _index(self) -> np.ndarray:
        return np.load(self.root / INDEX_FILE, mmap_mode="r")

    def _chunk(self, chunk: int) -> np.ndarray:
        """Chunk file ``chunk`` as a read-only uint8 array over a shared mapping (mapped once per process).

        Its size and CRC32 are checked when it is first mapped: damaged bytes stop the reader naming the
        chunk, instead of training on them (RAW) or failing in the JPEG decoder with no name. One pass
        over pages every reader maps anyway, at memory speed (ISA-L)."""
        data = self._chunks.get(chunk)
        if data is None:
            _, expected_size, expected_crc = self._chunk_table[chunk]
            path = chunk_path(self.root, chunk)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != expected_size:
                    raise StoreError(f"image store {self.root} is damaged: {path} has {size} bytes, expected "
                                     f"{expected_size}; run verify, and prepare it again")
                data = (np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
                        if size else np.empty(0, dtype=np.uint8))
            found = crc32(data)
            if found != expected_crc:
                raise StoreError(f"image store {self.root} is damaged: {path} (chunk {chunk}) has CRC32 {found:08x}, "
                                 f"expected {expected_crc:08x}; run verify, and prepare it again")
            self._chunks[chunk] = data
        return data

    def _rows(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"image ids must be in [0, {len(self)}); got {ids.min()}..{ids.max()}")
        return self._index[ids]

    def _decode(self, rows: np.ndarray, device: torch.device | str) -> list[torch.Tensor]:
        """The JPEG images of ``rows``, decoded in one batched call on ``device``."""
        from torchvision.io import ImageReadMode, decode_jpeg  # JPEG stores only: RAW readers skip the import

        encoded = [torch.from_numpy(self._chunk(c)[off:off + n].copy()) for c, off, n in rows.tolist()]
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if encoded else []
        except RuntimeError as e:  # bytes that passed their chunk's CRC32 but do not decode
            chunks = sorted({c for c, _, _ in rows.tolist()})
            raise StoreError(f"image store {self.root}: an image of chunk(s) {chunks} does not decode "
                             f"({str(e).splitlines()[0]}); run verify, and prepare it again") from e

    def read(self, ids: Sequence[int] | np.ndarray | torch.Tensor, out: torch.Tensor | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 (B, 3, S, S) images of ``ids``. ``out`` (a contiguous CPU uint8 tensor of that shape, e.g.
        pinned) is filled and returned instead of a new tensor. With ``device`` the result is moved there;
        JPEG stores decode there (on a GPU: nvJPEG, batched, and ``out`` is not used)."""
        rows = self._rows(ids)
        if self.format == "jpeg" and device is not None and torch.device(device).type != "cpu" and len(rows):
            return torch.stack([square(image, self.size) for image in self._decode(rows, device)])
        shape = (len(rows), 3, self.size, self.size)
        if out is None:
            out = torch.empty(shape, dtype=torch.uint8)
        elif out.shape != shape or out.dtype != torch.uint8 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"out must be a contiguous CPU uint8 tensor of shape {shape}; got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        if self.format == "raw":
            flat = out.numpy().reshape(len(rows), -1)
            for j, (c, off, n) in enumerate(rows.tolist()):
                flat[j] = self._chunk(c)[off:off + n]
        else:
            for j, image in enumerate(self._decode(rows, "cpu")):
                out[j] = square(image, self.size)
        return out if device is None else out.to(device, non_blocking=out.is_pinned())

    def read_variable(self, ids: Sequence[int] | np.ndarray | torch.Tensor,
                      device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The images of ``ids`` at their stored shape, uint8 (3, H, W) each: JPEG stores keep the source's
        aspect (longer side at most S), for crops that want it; RAW stores give their S x S squares."""
        if self.format == "raw":
            return list(self.read(ids, device=device))
        return self._decode(self._rows(ids), device or "cpu")


# ----------------------------------------------------------------------------- info and verify

def bytes_on_disk(root: Path) -> int:
    """Allocated bytes of every file under ``root`` (what the store takes from the disk)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def store_info(path: str | Path) -> dict[str, Any]:
    """The header's facts, the bytes on disk and whether every chunk file is present at its recorded
    size (cheap: one stat per chunk; ``verify_store`` reads the bytes)."""
    root = Path(path)
    header = read_header(root)
    table = np.load(root / CHUNK_TABLE)
    wrong = [chunk for chunk, (_, size, _) in enumerate(table.tolist())
             if not chunk_path(root, chunk).is_file() or chunk_path(root, chunk).stat().st_size != size]
    return {"path": str(root), **{k: header[k] for k in ("format_version", "format", "size", "quality", "images",
                                                         "skipped", "chunks", "data_bytes", "source")},
            "classes": len(header["classes"]), "bytes_on_disk": bytes_on_disk(root),
            "chunks_missing_or_wrong_size": wrong}


def file_crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(VERIFY_BLOCK):
            value = crc32(block, value)
    return value


def verify_store(path: str | Path) -> list[str]:
    """One line per damaged chunk (missing, wrong size or CRC32 mismatch) or table; empty when all is good."""
    root = Path(path)
    header = read_header(root)
    table = np.load(root / CHUNK_TABLE)
    problems = []
    if table.shape != (header["chunks"], 3):
        problems.append(f"{CHUNK_TABLE}: shape {table.shape}, expected ({header['chunks']}, 3)")
    for name, shape in ((INDEX_FILE, (header["images"], 3)), (LABELS_FILE, (header["images"],))):
        try:
            found = np.load(root / name, mmap_mode="r").shape
        except (OSError, ValueError) as e:
            problems.append(f"{name}: unreadable ({e})")
            continue
        if found != shape:
            problems.append(f"{name}: shape {found}, expected {shape}")
    first_id = 0
    for chunk, (images, size, checksum) in enumerate(table.tolist()):
        where = f"chunk {chunk} ({chunk_path(root, chunk).relative_to(root)}, images {first_id}..{first_id + images - 1})"
        first_id += images
        try:
            found_size = chunk_path(root, chunk).stat().st_size
            found = file_crc32(chunk_path(root, chunk)) if found_size == size else None
        except OSError as e:
            problems.append(f"{where}: unreadable ({e.strerror or e})")
            continue
        if found_size != size:
            problems.append(f"{where}: {found_size} bytes, expected {size}")
        elif found != checksum:
            problems.append(f"{where}: CRC32 {found:08x}, expected {checksum:08x}")
    return problems
