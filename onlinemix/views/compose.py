"""View composition: from one batch of uint8 images to a method's float views.

The trainer gathers each batch into :class:`~onlinemix.exchange.lookup.PairImages` (real images, second
images, which second images are synthetic, image ids) and a :class:`ViewComposer` turns it into
:class:`Views`, the input of the method's loss:

    composer = ViewComposer(method.view_plan, build_pairing(cfg.train), Augmentation.from_config(cfg),
                            cfg.data.resolution, seed, labels)
    views = composer(batch, epoch, step)            # per-image torchvision v2 transforms, CPU
    loss, logs = model(views.to(device), info)

A method says which views its loss takes with a *view plan* (:class:`TwoViews`,
:class:`ClassifierViews`, :class:`MultiCrops`); it never sees the uint8 images.

Pairings (``train.pairing``, registered in ``registry.PAIRINGS``) say which image each view is
cropped from; the augmentation recipe follows the image's source (real images get the real-branch
recipe, synthetic ones the synthetic-branch recipe), and a sample without a synthetic view
(``is_synthetic`` False: a fallback) uses its real image wherever a synthetic one was asked for:

- ``mixdiff``: view a real, view b synthetic (DINO: 1 global + 6 local real crops, 1 global + 2
  local synthetic crops);
- ``real``: both views from the real image (plain SSL; DINO: multi-crop of the real image);
- ``synthetic``: both views from the synthetic image (the paper's "Syn" models);
- ``mixing``: each sample independently (50/50, the composer's seeded coin) uses its real or
  its synthetic image for both views;
- ``sequential``: ``real`` for ``train.sequential_real_epochs`` epochs (0 = half), then ``synthetic``.

The supervised baseline (:class:`ClassifierViews`) classifies one view per sample from the
pairing's source, or both views under ``mixdiff`` (each image and its variation, with the real
label). Its labels are looked up here, by image id: they are per-sample data that travel with the
views, so the method needs no dataset-sized table on the device (which DDP would broadcast as a
buffer at every step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from onlinemix.core.config import Config, TrainConfig
from onlinemix.core.registry import PAIRINGS
from onlinemix.exchange.lookup import PairImages
from onlinemix.views.backends import PerImageViews, ViewBackend
from onlinemix.views.recipes import multicrop_sizes
from onlinemix.views.specs import ViewSpec, mixdiff_dino_specs, multicrop_specs, pair_specs

# ----------------------------------------------------------------------------- pairings


class Sources(NamedTuple):
    """Per sample, the uint8 images (B, 3, R, R) of views a and b, and which of them are synthetic."""
    a: torch.Tensor
    a_synthetic: torch.Tensor
    b: torch.Tensor
    b_synthetic: torch.Tensor


class Pairing(ABC):
    """Which image each view of each sample comes from."""

    uses_synthetic: ClassVar[bool] = True  # reads synthetic views (producers, the ring or the cache)
    two_sources: ClassVar[bool] = False    # views a and b come from different images

    @classmethod
    def from_config(cls, train: TrainConfig) -> Pairing:
        return cls()

    def at(self, epoch: int) -> Pairing:
        """The pairing in force at ``epoch``."""
        return self

    @abstractmethod
    def sources(self, batch: PairImages, coin: torch.Generator) -> Sources:
        """The images of views a and b; ``coin`` draws the per-sample choices of 'mixing'."""


@dataclass(frozen=True)
class MixDiff(Pairing):
    """View a from the real image, view b from its synthetic variation."""

    two_sources = True

    def sources(self, batch: PairImages, coin: torch.Generator) -> Sources:
        return Sources(batch.real, torch.zeros_like(batch.is_synthetic), batch.other, batch.is_synthetic)


@dataclass(frozen=True)
class Real(Pairing):
    """Both views from the real image: plain SSL, no synthetic views needed."""

    uses_synthetic = False

    def sources(self, batch: PairImages, coin: torch.Generator) -> Sources:
        none = torch.zeros_like(batch.is_synthetic)
        return Sources(batch.real, none, batch.real, none)


@dataclass(frozen=True)
class Synthetic(Pairing):
    """Both views from the synthetic image (the paper's "Syn" models)."""

    def sources(self, batch: PairImages, coin: torch.Generator) -> Sources:
        return Sources(batch.other, batch.is_synthetic, batch.other, batch.is_synthetic)


@dataclass(frozen=True)
class Mixing(Pairing):
    """Each sample uses its real or its synthetic image (50/50) for both views."""

    def sources(self, batch: PairImages, coin: torch.Generator) -> Sources:
        pick = torch.rand(len(batch.is_synthetic), generator=coin) < 0.5
        images = torch.where(pick[:, None, None, None], batch.other, batch.real)
        synthetic = pick & batch.is_synthetic
        return Sources(images, synthetic, images, synthetic)


@dataclass(frozen=True)
class Sequential(Pairing):
    """'real' before ``switch_epoch``, then 'synthetic'."""

    switch_epoch: int

    @classmethod
    def from_config(cls, train: TrainConfig) -> Sequential:
        return cls(train.sequential_real_epochs or train.epochs // 2)

    def at(self, epoch: int) -> Pairing:
        return Real() if epoch < self.switch_epoch else Synthetic()

    def sources(self, batch: PairImages, coin: torch.Generator) -> Sources:
        raise ValueError("'sequential' changes with the epoch: take the sources of sequential.at(epoch)")


def build_pairing(train: TrainConfig) -> Pairing:
    """The configured pairing (``train.pairing``, resolved through ``registry.PAIRINGS``)."""
    return PAIRINGS.load(train.pairing).from_config(train)


# ----------------------------------------------------------------------------- view plans


@dataclass(frozen=True)
class TwoViews:
    """Views a and b of every sample (SimCLR, BarlowTwins)."""


@dataclass(frozen=True)
class ClassifierViews:
    """View a of every sample, and view b too under a two-source pairing, with the real images'
    labels (the supervised baseline)."""


@dataclass(frozen=True)
class MultiCrops:
    """DINO's crops, the 2 globals first: under a two-source pairing 1 global + 6 local crops of the
    real image and 1 global + 2 local of the synthetic one (the paper's split), otherwise 2 globals
    + ``local_crops`` locals of the one image. Global crops cover [global_crop_min, 1] of the
    image, local crops [0.05, global_crop_min]."""

    global_crop_min: float
    local_crops: int


ViewPlan = TwoViews | ClassifierViews | MultiCrops

N_GLOBAL_CROPS = 2
MIXDIFF_LOCAL_CROPS = (6, 2)  # real, synthetic
LOCAL_CROP_MIN = 0.05


# ----------------------------------------------------------------------------- composition


@dataclass(frozen=True)
class Views:
    """A batch's float views for a method's loss."""

    images: list[torch.Tensor]          # float (B, 3, S, S) per view
    n_global: int                       # the leading views are full-size (DINO's teacher inputs), the rest local crops
    labels: torch.Tensor | None = None  # int64 (B,): the real images' labels (ClassifierViews)

    def to(self, device: torch.device, non_blocking: bool = False) -> Views:
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        return Views([v.to(device, non_blocking=non_blocking) for v in self.images], self.n_global, labels)


@dataclass(frozen=True)
class Augmentation:
    """The view recipe (``train.augmentation``) and the crop bound of its two-view recipes."""

    recipe: str
    min_crop_scale: float

    @classmethod
    def from_config(cls, cfg: Config) -> Augmentation:
        return cls(cfg.train.augmentation, cfg.data.min_crop_scale)

    @property
    def photometric(self) -> bool:
        """Colour, blur and solarisation on top of crops and flips (off for the flip-only ablation)."""
        return self.recipe != "no_augmentation"


def batch_seeds(seed: int, step: int) -> tuple[int, int]:
    """The seeds of step ``step``'s mixing coin and view parameters: a pure function of (seed, step), so
    that no generator state needs saving and a run resumed at any step (whatever the input pipeline
    had made ahead when it stopped) draws what the uninterrupted run drew."""
    coin, views = np.random.SeedSequence([seed, step]).generate_state(2)
    return int(coin), int(views)


class ViewComposer:
    """Batch in, views out: the float views a method's plan asks for, under the pairing in force.

    ``seed`` and the step seed the composer's coin (the 'mixing' choices) and the backend's parameters
    (:func:`batch_seeds`): give each trainer rank its own seed. ``labels`` (int64, indexed by image id)
    are needed by :class:`ClassifierViews` only. ``backend`` makes the pixels (default: torchvision per
    image).
    """

    def __init__(self, plan: ViewPlan, pairing: Pairing, augmentation: Augmentation, resolution: int, seed: int,
                 labels: torch.Tensor | None = None, backend: ViewBackend | None = None) -> None:
        if isinstance(plan, ClassifierViews) and labels is None:
            raise ValueError("classifier views need the real images' labels")
        self.plan = plan
        self.pairing = pairing
        self.labels = labels
        self.seed = seed
        self.backend = backend or PerImageViews()
        self.branches = pair_specs(augmentation.recipe, resolution, augmentation.min_crop_scale)
        if isinstance(plan, MultiCrops):
            global_size, local_size = multicrop_sizes(resolution)
            scales = dict(global_scale=(plan.global_crop_min, 1.0), local_scale=(LOCAL_CROP_MIN, plan.global_crop_min),
                          photometric=augmentation.photometric)
            self.mixdiff_crops = mixdiff_dino_specs(global_size, local_size, *MIXDIFF_LOCAL_CROPS, **scales)
            self.multicrop = multicrop_specs(global_size, local_size, N_GLOBAL_CROPS, plan.local_crops, **scales)

    def augment(self, images: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
        """One view of each image, with its source's recipe."""
        return self.backend(images, synthetic, *self.branches)

    def crops(self, specs: tuple[ViewSpec, ...], sources: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One batch per crop spec, each from the images of its source ('real' = view a's, 'synthetic' = b's)."""
        images = sources["real"]
        every = torch.zeros(len(images), dtype=torch.bool)
        return [self.backend(sources[spec.source], every, spec, spec) for spec in specs]

    def __call__(self, batch: PairImages, epoch: int, step: int) -> Views:
        """The views of training step ``step`` (in ``epoch``)."""
        coin_seed, views_seed = batch_seeds(self.seed, step)
        self.backend.reseed(views_seed)
        pairing = self.pairing.at(epoch)
        s = pairing.sources(batch, torch.Generator().manual_seed(coin_seed))
        match self.plan:
            case MultiCrops():
                specs = self.mixdiff_crops if pairing.two_sources else self.multicrop
                return Views(self.crops(specs, {"real": s.a, "synthetic": s.b}), N_GLOBAL_CROPS)
            case ClassifierViews():
                images = [self.augment(s.a, s.a_synthetic)]
                if pairing.two_sources:
                    images.append(self.augment(s.b, s.b_synthetic))
                return Views(images, len(images), self.labels[batch.ids])
            case TwoViews():
                return Views([self.augment(s.a, s.a_synthetic), self.augment(s.b, s.b_synthetic)], 2)
        raise TypeError(f"not a view plan: {self.plan!r}")
