"""Real images for training and evaluation: which images a run trains on and holds out.

Every process of a run (trainers, producers, cache warm, eval, stats) sees the same
:class:`RealImages`, so an image id means the same pixels everywhere and only ids cross process
boundaries.

- :mod:`onlinemix.data.decode`: image files to uint8 tensors (digits, ImageFolder, webdataset);
- :mod:`onlinemix.data.store`: the prepared, memory-mapped image store, read by id;
- :mod:`onlinemix.data.prepare` and :mod:`onlinemix.data.sources`: building a store;
- ``python -m onlinemix.data``: prepare, info and verify stores.

Builds on: core.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from onlinemix.core.config import DataConfig
from onlinemix.data.decode import DataError, LabelledImages, load_digits, load_image_source
from onlinemix.data.prepare import PrepareBusy, PrepareError, Settings, default_workers
from onlinemix.data.prepare import prepare as prepare_store  # the name `prepare` stays the submodule
from onlinemix.data.store import ImageStore, StoreError, check_resolution, is_image_store

log = logging.getLogger(__name__)

PREPARE_POLL_S = 2.0

__all__ = ["DataError", "Images", "LabelledImages", "RealImages", "fraction_subset", "load_image_source",
           "load_real_images", "select_train_ids", "split_ids", "subset"]

Images = Union[torch.Tensor, ImageStore, "StoreSubset"]
"""uint8 images (N, 3, S, S) indexed by id: in memory (the digits), or read from a store on access."""


@dataclass
class RealImages:
    images: Images              # (N, 3, S, S) uint8: S = the stored size, which the ring and cache hold
    labels: torch.Tensor        # (N,) int64
    classes: list[str]
    train_ids: torch.Tensor     # ids the self-supervised trainer and the probe fit on
    holdout_ids: torch.Tensor   # ids only the probe's evaluation sees

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> int:
        """S: the side of the stored images (the views are crops of data.resolution from them)."""
        return self.images.shape[-1]


class StoreSubset:
    """Some ids of a store, indexable like a tensor and read on access: an evaluation split of
    ImageNet is never decoded or held in memory as a whole."""

    def __init__(self, store: ImageStore, ids: torch.Tensor) -> None:
        self.store = store
        self.ids = ids

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.ids), 3, self.store.size, self.store.size)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int | slice | torch.Tensor) -> torch.Tensor:
        return self.store[self.ids[index]]


def subset(images: Images, ids: torch.Tensor) -> Images:
    """``images[ids]``, without reading anything yet when the images live in a store."""
    if isinstance(images, ImageStore):
        return StoreSubset(images, ids)
    if isinstance(images, StoreSubset):
        return StoreSubset(images.store, images.ids[ids])
    return images[ids]


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


def load_real_images(cfg: DataConfig, store_root: Path | None = None) -> RealImages:
    """The run's real images: the bundled digits in memory, or a store read by id. A dataset that is
    not a store yet is prepared once into ``store_root`` (``Config.store_root()``)."""
    if cfg.dataset == "digits":
        images, labels, classes = load_digits(cfg.stored_size or cfg.resolution)
    else:
        store = open_store(cfg, store_root)
        images, labels, classes = store, store.labels, store.classes
    train_ids, holdout_ids = split_ids(len(images), cfg.holdout_fraction)
    return RealImages(images, labels, classes, train_ids, holdout_ids)


def open_store(cfg: DataConfig, store_root: Path | None) -> ImageStore:
    """``data.dataset`` as a store: itself when it is one, else the store a run prepares of it."""
    try:
        if is_image_store(cfg.dataset):
            store = ImageStore.open(cfg.dataset)
            if cfg.stored_size and cfg.stored_size != store.size:
                raise DataError(f"data.stored_size={cfg.stored_size} but the store {cfg.dataset} holds "
                                f"{store.size} px images: leave data.stored_size at 0 for a prepared store")
        elif store_root is None:
            raise DataError(f"{cfg.dataset} is not a prepared image store: prepare it with "
                            f"`python -m onlinemix.data prepare {cfg.dataset} --out STORE`")
        else:
            store = prepared_store(cfg, store_root)
        check_resolution(store, cfg.resolution)
    except (PrepareError, StoreError) as e:
        raise DataError(str(e)) from None
    return store


def prepared_store(cfg: DataConfig, store_root: Path) -> ImageStore:
    """The store of an ImageFolder or webdataset dataset under ``store_root``, prepared on first use.

    Named by the source's absolute path and the settings, so runs with the same data share it.
    Prepare is resumable and locked: a second process (another rank of this node, or a node
    sharing the cache directory) that finds it in progress waits for it to finish.
    """
    settings = Settings(size=cfg.stored_size or cfg.resolution, format=cfg.store_format)
    source = str(Path(cfg.dataset).resolve()) if "{" not in cfg.dataset else cfg.dataset
    digest = hashlib.sha256(f"{source}|{settings.size}|{settings.format}".encode()).hexdigest()[:12]
    root = store_root / f"{Path(cfg.dataset.split('{')[0]).name or 'shards'}-{settings.format}{settings.size}-{digest}"
    while not is_image_store(root):
        try:
            prepare_store(cfg.dataset, root, settings, default_workers())
        except PrepareBusy:
            log.info("waiting for another process to finish preparing %s", root)
            time.sleep(PREPARE_POLL_S)
    return ImageStore.open(root)


REAL_FRACTION_SEED = 0  # the subset is a property of the data, not of the training seed


def select_train_ids(real: RealImages, cfg: DataConfig) -> torch.Tensor:
    """The ids the self-supervised trainer and the producers schedule: all of ``real.train_ids``,
    or the class-stratified ``cfg.real_fraction`` subset of them. The one place this choice is
    made, so the trainers' and the producers' EpochSchedules agree position by position."""
    if cfg.real_fraction >= 1.0:
        return real.train_ids
    return fraction_subset(real.train_ids, cfg.real_fraction, REAL_FRACTION_SEED, real.labels)

