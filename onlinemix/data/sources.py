"""Where a store's images come from: an ImageFolder tree, webdataset tar shards or the bundled
digits, handed to prepare as numbered chunks of source images.

A source fixes the order of its images (ImageFolder: classes sorted, files sorted within each,
as ``onlinemix.data`` reads them; webdataset: shards in order, samples in order), so chunk k
always holds the same images and a resumed prepare writes the same bytes. Only listing happens
here; decoding is the prepare workers' job.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onlinemix.data.decode import IMAGE_SUFFIXES, DataError, _sample_image_key, load_digits

if TYPE_CHECKING:
    import torch

# webdataset's sample key: the member path up to the first dot of its file name
WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True, slots=True)  # slots: an ImageNet listing is a million of these
class SourceImage:
    """One source image: ``data`` is a file path (str), an encoded image (bytes, a webdataset sample) or
    decoded uint8 (3, H, W) pixels; ``problem`` says why it cannot be used when that is known before decoding."""

    name: str
    label: int
    data: str | bytes | np.ndarray | None
    problem: str | None = None


@dataclass
class ChunkTask:
    """Chunk ``index`` of a store: source images ``index * chunk_images`` onwards."""

    index: int
    images: list[SourceImage]


@dataclass
class Source:
    """A listed source: what it is (recorded in the store), its classes (None: named after the integer
    labels), its image count and the directories it could not read."""

    kind: str
    path: str
    classes: list[str] | None
    total: int
    digest: str
    problems: list[tuple[str, str]] = field(default_factory=list)
    images: list[SourceImage] | None = None  # listed up front (ImageFolder, digits), else streamed
    urls: list[str] = field(default_factory=list)  # webdataset shards

    def description(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "images": self.total, "digest": self.digest}

    def chunks(self, chunk_images: int, committed: set[int]) -> Iterator[ChunkTask]:
        """Every chunk not in ``committed``, in order. Webdataset shards are read through to the end
        even when every chunk is committed (tar has no random access), but nothing is decoded here."""
        if self.images is not None:
            for index in range(math.ceil(self.total / chunk_images)):
                if index not in committed:
                    yield ChunkTask(index, self.images[index * chunk_images:(index + 1) * chunk_images])
            return
        batch: list[SourceImage] = []
        count = 0
        for count, image in enumerate(webdataset_images(self.urls, len(self.classes or ())), start=1):
            chunk = (count - 1) // chunk_images
            if chunk not in committed:
                batch.append(image)
            if batch and (count % chunk_images == 0 or count == self.total):
                yield ChunkTask(chunk, batch)
                batch = []
        if count != self.total:
            raise DataError(f"webdataset shards {self.path} yielded {count} samples, but their tar headers list "
                            f"{self.total}: did they change while preparing?")


def lines_digest(lines: Iterator[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- ImageFolder

def folder_source(root: Path) -> Source:
    """root/<class>/.../<image>: files with an image suffix, sorted; unreadable directories are recorded."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as e:
        raise DataError(f"cannot read {root}: {e.strerror or e}") from e
    if not classes:
        raise DataError(f"{root} has no class sub-directories (expected root/<class>/<image>)")
    images: list[SourceImage] = []
    problems: list[tuple[str, str]] = []
    for label, name in enumerate(classes):
        files = []
        for directory, _, names in os.walk(root / name, onerror=lambda e: problems.append(
                (os.path.relpath(e.filename, root), f"unreadable directory ({e.strerror})"))):
            files += [os.path.join(directory, f) for f in names if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
        # ordered as sorted Paths are (component by component), as onlinemix.data lists them
        images += [SourceImage(os.path.relpath(f, root), label, f) for f in sorted(files, key=lambda f: f.split(os.sep))]
    if not images:
        raise DataError(f"no image files under {root}")
    return Source("imagefolder", str(root), classes, len(images),
                  lines_digest(f"{image.label}\t{image.name}" for image in images), problems, images)


# ----------------------------------------------------------------------------- webdataset

def shard_urls(text: str) -> list[str] | None:
    """The tar shards ``text`` names (a brace pattern, one .tar, a directory of .tar files), else None."""
    path = Path(text)
    if "{" in text:
        from braceexpand import braceexpand  # a webdataset dependency

        return list(braceexpand(text))
    if path.is_file() and path.suffix == ".tar":
        return [text]
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar")) or None
    return None


def count_samples(url: str) -> int:
    """Samples in one tar shard, from its member headers only (consecutive members sharing a key)."""
    keys, last = 0, None
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                match = WDS_KEY.match(member.name)
                if member.isfile() and match and match.group(1) != last:
                    keys, last = keys + 1, match.group(1)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"cannot read webdataset shard {url}: {e}") from e
    return keys


def webdataset_images(urls: list[str], n_classes: int) -> Iterator[SourceImage]:
    """Every sample of the shards, in order: its image bytes and integer ``cls``, or the problem with it."""
    import webdataset as wds

    try:
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            name = f"{Path(sample['__url__']).name}:{sample['__key__']}"
            key = _sample_image_key(sample)
            try:
                label = int(sample["cls"].decode().strip())
            except (KeyError, ValueError, AttributeError):
                label = None
            problem = (f"no image (keys {sorted(k for k in sample if not k.startswith('__'))})" if key is None else
                       "no integer cls" if label is None else
                       f"cls {label} is not one of the {n_classes} classes"
                       if label < 0 or (n_classes and label >= n_classes) else None)
            yield SourceImage(name, -1, None, problem) if problem else SourceImage(name, label, sample[key])
    except (OSError, ValueError, tarfile.TarError) as e:
        raise DataError(f"cannot read webdataset shards: {e.__class__.__name__}: {e}") from e


def webdataset_source(text: str, urls: list[str], classes: list[str] | None) -> Source:
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataError(f"webdataset shard(s) not found: {', '.join(missing[:3])}")
    total = sum(count_samples(u) for u in urls)
    if not total:
        raise DataError(f"no samples in webdataset shards {text}")
    return Source("webdataset", text, classes, total,
                  lines_digest(f"{Path(u).name}\t{Path(u).stat().st_size}" for u in urls), urls=urls)


# ----------------------------------------------------------------------------- arrays

def array_source(kind: str, pixels: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 classes: list[str], digest: str) -> Source:
    """Images already decoded, uint8 (N, 3, H, W): the bundled digits, or synthetic benchmark data."""
    pixels = np.asarray(pixels)
    images = [SourceImage(f"{kind}:{i}", int(label), image) for i, (image, label) in enumerate(zip(pixels, labels))]
    return Source(kind, kind, classes, len(images), digest, images=images)


# ----------------------------------------------------------------------------- opening

def open_source(text: str, size: int, classes_file: Path | None = None) -> Source:
    """``digits``, an ImageFolder directory, one .tar shard, a directory of shards or a brace pattern.
    ``classes_file`` names a webdataset source's classes, one per line (line i is ``cls`` i)."""
    urls = None if text == "digits" else shard_urls(text)
    if classes_file is not None and urls is None:
        raise DataError("--classes names the classes of webdataset shards; ImageFolder and digits have their own")
    if urls is not None:
        classes = None if classes_file is None else [c for c in classes_file.read_text().splitlines() if c.strip()]
        return webdataset_source(text, urls, classes)
    if text == "digits":
        return array_source("digits", *load_digits(size), "uci-digits-sklearn")
    path = Path(text).resolve()
    if not path.exists():
        raise DataError(f"{text} does not exist")
    if not path.is_dir():
        raise DataError(f"{text} is neither an ImageFolder directory, a .tar shard nor a directory of .tar shards")
    return folder_source(path)
