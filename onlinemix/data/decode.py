"""Image files to uint8 tensors: the bundled digits, ImageFolder trees and webdataset shards.

Decoding happens once per call and the whole set is held in memory: right for the bundled
digits, small evaluation sets and tests. Large training sets are prepared once into an image
store (:mod:`onlinemix.data.store`) and read from it by id instead.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from onlinemix.core.errors import UserError

log = logging.getLogger(__name__)

WDS_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(UserError, ValueError):
    """The real dataset is missing, empty or unreadable."""


def load_digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The UCI handwritten digits (as shipped by scikit-learn): 8x8, 17 grey levels, to RGB."""
    with resources.files("onlinemix").joinpath("assets/digits.npz").open("rb") as fh:
        arrays = np.load(fh)
        grey = torch.from_numpy(arrays["images"].astype(np.float32) * (255.0 / 16.0))
        labels = torch.from_numpy(arrays["labels"].astype(np.int64))
    up = F.interpolate(grey[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = up.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, labels, [str(d) for d in range(10)]


def _load_rgb(path: Path, resolution: int) -> torch.Tensor:
    with Image.open(path) as img:
        img.load()
        return _to_rgb_tensor(img, resolution, str(path))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to RGB: 16-bit grey mapped onto 8 bits (the full range, not clipped), alpha dropped,
    palettes and CMYK converted. Stores and in-memory loading convert alike."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def square_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(new width, new height, left, top): the short side scaled to ``size``, then the centre
    ``size`` x ``size`` crop. One rounding for training images, RAW stores and squared JPEGs."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    return new_w, new_h, (new_w - size) // 2, (new_h - size) // 2


def _to_rgb_tensor(img: Image.Image, resolution: int, name: str) -> torch.Tensor:
    """Decode any mode (grey, RGBA, palette, 16-bit) to RGB, resize the short side, centre crop."""
    img = to_rgb(img)
    w, h = img.size
    if w == 0 or h == 0:
        raise DataError(f"{name}: zero-size image")
    new_w, new_h, left, top = square_geometry(w, h, resolution)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image_folder(root: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder tree (root/class/image); unreadable files are skipped with a warning naming them."""
    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-directories (expected root/<class>/<image>)")
    images, labels, bad = [], [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                images.append(_load_rgb(path, resolution))
                labels.append(label)
            except (UnidentifiedImageError, OSError, DataError, ValueError) as e:
                bad.append(f"{path} ({e.__class__.__name__}: {e})")
    for line in bad:
        log.warning("skipping unreadable image %s", line)
    if not images:
        raise DataError(f"no readable images under {root}" + (f"; {len(bad)} unreadable" if bad else ""))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes


@dataclass
class LabelledImages:
    """Images of an evaluation source; ``classes`` is None for webdataset shards (integer ``cls`` only)."""

    images: torch.Tensor        # (N, 3, R, R) uint8 (or an ImageStore, which indexes like one)
    labels: torch.Tensor        # (N,) int64
    classes: list[str] | None


def _sample_image_key(sample: dict) -> str | None:
    return next((k for k in sample if k.rsplit(".", 1)[-1].lower() in WDS_IMAGE_EXTENSIONS), None)


def load_webdataset(urls: list[str], resolution: int) -> LabelledImages:
    """Webdataset tar shards whose samples hold an image (jpg, png, ...) and an integer ``cls``."""
    import webdataset as wds  # only evaluation sets need it

    images, labels = [], []
    try:
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
            key = _sample_image_key(sample)
            if key is None or "cls" not in sample:
                raise DataError(f"{where} has keys {sorted(k for k in sample if not k.startswith('__'))}; "
                                f"expected an image ({', '.join(sorted(WDS_IMAGE_EXTENSIONS))}) and 'cls'")
            with Image.open(io.BytesIO(sample[key])) as img:
                images.append(_to_rgb_tensor(img, resolution, where))
            labels.append(int(sample["cls"].decode().strip()))
    except (OSError, ValueError, tarfile.TarError, UnidentifiedImageError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read webdataset shards {urls}: {e.__class__.__name__}: {e}") from e
    if not images:
        raise DataError(f"no samples in webdataset shards {urls}")
    return LabelledImages(torch.stack(images), torch.tensor(labels, dtype=torch.int64), None)


def load_image_source(path: str | Path, resolution: int) -> LabelledImages:
    """An ImageFolder directory, one ``.tar`` shard, a brace pattern of shards (``s-{000..009}.tar``)
    or a directory of ``.tar`` shards."""
    text = str(path)
    path = Path(text)
    if "{" in text:
        from braceexpand import braceexpand  # a webdataset dependency

        return load_webdataset(list(braceexpand(text)), resolution)
    if path.is_file() and path.suffix == ".tar":
        return load_webdataset([text], resolution)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if shards:
            return load_webdataset(shards, resolution)
        return LabelledImages(*load_image_folder(path, resolution))
    if not path.exists():
        raise DataError(f"{path} does not exist")
    raise DataError(f"{path} is neither an ImageFolder directory, a .tar shard nor a directory of .tar shards")
