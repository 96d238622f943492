"""Real images: the bundled digits set or any ImageFolder directory, decoded once to uint8.

Both producers and trainers hold the same (N, 3, R, R) uint8 tensor, so an image id means
the same pixels everywhere and only ids ever cross process boundaries.
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

from .config import DataConfig

log = logging.getLogger(__name__)

WDS_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(ValueError):
    """The real dataset is missing, empty or unreadable."""


@dataclass
class RealImages:
    images: torch.Tensor        # (N, 3, R, R) uint8
    labels: torch.Tensor        # (N,) int64
    classes: list[str]
    train_ids: torch.Tensor     # ids the self-supervised trainer and the probe fit on
    holdout_ids: torch.Tensor   # ids only the probe's evaluation sees

    def __len__(self) -> int:
        return self.images.shape[0]


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


def _to_rgb_tensor(img: Image.Image, resolution: int, name: str) -> torch.Tensor:
    """Decode any mode (grey, RGBA, palette, 16-bit) to RGB, resize the short side, centre crop."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: map the full range to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    if w == 0 or h == 0:
        raise DataError(f"{name}: zero-size image")
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                     Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
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

    images: torch.Tensor        # (N, 3, R, R) uint8
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


def split_ids(n: int, holdout_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split; the same seed always holds out the same images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, round(n * holdout_fraction))
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


def fraction_subset(train_ids: torch.Tensor, fraction: float, seed: int = 0,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """The first `fraction` of the training images (the paper's 25/50/100% real-data study), sorted.

    All ids are put in one seeded order and a subset is a prefix of it, so for one seed the 25%
    subset lies inside the 50% one and growing the fraction only adds images. With `labels`
    (indexed by image id, e.g. RealImages.labels) the order interleaves the classes: an image at
    rank r of its class's n_c images sits at key (r + 0.5) / n_c, ties broken at random, so every
    prefix holds each class in proportion (about fraction * n_c images of it, off by at most one
    for balanced classes) while the total is exactly round(fraction * len(train_ids)), at least 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = len(train_ids)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    if labels is not None:
        if labels.ndim != 1 or len(labels) <= int(train_ids.max()):
            raise ValueError(f"labels must be indexed by image id: {tuple(labels.shape)} for max id {int(train_ids.max())}")
        shuffled = labels[train_ids[order]]
        keys = torch.empty(n, dtype=torch.float64)
        for c in shuffled.unique():
            members = (shuffled == c).nonzero().squeeze(1)  # in random order: rank within the class
            keys[members] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
        tiebreak = torch.rand(n, generator=gen, dtype=torch.float64)
        order = order[torch.from_numpy(np.lexsort((tiebreak.numpy(), keys.numpy())))]
    keep = max(1, round(fraction * n))
    return train_ids[order[:keep]].sort().values


def load_real_images(cfg: DataConfig) -> RealImages:
    if cfg.dataset == "digits":
        images, labels, classes = load_digits(cfg.resolution)
    else:
        images, labels, classes = load_image_folder(Path(cfg.dataset), cfg.resolution)
    train_ids, holdout_ids = split_ids(len(images), cfg.holdout_fraction)
    return RealImages(images, labels, classes, train_ids, holdout_ids)


REAL_FRACTION_SEED = 0  # the subset is a property of the data, not of the training seed


def select_train_ids(real: RealImages, cfg: DataConfig) -> torch.Tensor:
    """The ids the self-supervised trainer and the producers schedule: all of ``real.train_ids``,
    or the class-stratified ``cfg.real_fraction`` subset of them. The one place this choice is
    made, so the trainers' and the producers' EpochSchedules agree position by position."""
    if cfg.real_fraction >= 1.0:
        return real.train_ids
    return fraction_subset(real.train_ids, cfg.real_fraction, REAL_FRACTION_SEED, real.labels)


def main(argv: list[str] | None = None) -> None:
    """``python -m onlinemix.data`` / ``onlinemix-data``: prepare, info and verify image stores."""
    from .store_command import main as store_command  # the command's imports stay out of every data user

    store_command(argv)


if __name__ == "__main__":
    main()
