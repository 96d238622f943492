"""Real images for training and evaluation: which images a run trains on and holds out.

Every process of a run (trainers, producers, cache warm, eval, stats) sees the same
:class:`RealImages`, so an image id means the same pixels everywhere and only ids cross process
boundaries.

- :mod:`onlinemix.data.decode`: image files to uint8 tensors (digits, ImageFolder, webdataset);
- :mod:`onlinemix.data.store`: the prepared, memory-mapped image store, read by id;
- :mod:`onlinemix.data.prepare` and :mod:`onlinemix.data.sources`: building a store;
- ``python -m onlinemix.data``: prepare, info and verify stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .decode import DataError, LabelledImages, load_digits, load_image_folder, load_image_source

__all__ = ["DataError", "LabelledImages", "RealImages", "fraction_subset", "load_image_source", "load_real_images",
           "select_train_ids", "split_ids"]


@dataclass
class RealImages:
    images: torch.Tensor        # (N, 3, R, R) uint8
    labels: torch.Tensor        # (N,) int64
    classes: list[str]
    train_ids: torch.Tensor     # ids the self-supervised trainer and the probe fit on
    holdout_ids: torch.Tensor   # ids only the probe's evaluation sees

    def __len__(self) -> int:
        return self.images.shape[0]


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

