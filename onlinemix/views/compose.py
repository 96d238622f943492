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
from functools import partial
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from onlinemix.core.config import Config, ConfigError, TrainConfig
from onlinemix.core.registry import PAIRINGS
from onlinemix.exchange.lookup import PairImages
from onlinemix.views.buffers import RecycledTensors
from onlinemix.views.compiled import COMPILE_MIN_SIZE, warm_up
from onlinemix.views.params import ViewParams, sample_view_params
from onlinemix.views.recipes import ViewRecipe, build_transform, multicrop_sizes
from onlinemix.views.specs import ViewSpec, mixdiff_dino_specs, multicrop_specs, pair_specs
from onlinemix.views.torch_backend import augment_views

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


# ----------------------------------------------------------------------------- backends


class PerImageViews:
    """torchvision.transforms.v2, one call per image on the CPU: the ground truth the batched
    backends are tested against (their parameters are drawn from the same distributions)."""

    name = "torchvision"

    def __init__(self) -> None:
        self._transforms: dict[ViewSpec, object] = {}

    def reseed(self, seed: int) -> None:
        """v2 transforms draw from torch's global generator, so that is what a batch's seed sets."""
        torch.manual_seed(seed)

    def __call__(self, images: torch.Tensor, synthetic: torch.Tensor, real: ViewSpec, other: ViewSpec) -> torch.Tensor:
        pick = [self._transform(other if syn else real) for syn in synthetic.tolist()]
        return torch.stack([transform(image) for transform, image in zip(pick, images.cpu(), strict=True)])

    def _transform(self, spec: ViewSpec):
        if spec not in self._transforms:
            self._transforms[spec] = build_transform(spec.recipe, spec.size)
        return self._transforms[spec]


class BatchedViews:
    """A whole batch per call: per-sample parameters drawn as torchvision draws them
    (``view_params``), pixels made by the plain-torch backend (``compiled``: with hue compiled) or
    the fused Triton kernels on the device, from its own seeded generator. On the CPU, output batches
    are recycled once nothing holds them (``buffers``)."""

    def __init__(self, name: str, device: torch.device, seed: int) -> None:
        self.name = name
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.outputs = RecycledTensors() if device.type == "cpu" else None
        if name == "triton":
            from onlinemix_kernels.augment import augment_views_triton  # imports triton: only when chosen

            def run(images: torch.Tensor, params: ViewParams, out: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
                views = augment_views_triton(images, params, torch.float32)
                return views if out is None else out.index_copy_(0, rows.to(out.device), views)
            self.run = run
        else:
            self.run = partial(augment_views, compiled=name == "compiled")

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor, synthetic: torch.Tensor, real: ViewSpec, other: ViewSpec) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        shape = (len(images), 3, real.size, real.size)
        out = self.outputs.empty(shape) if self.outputs is not None else None  # None: the backend allocates
        if real == other:  # one recipe for every row: no split
            return self.run(images, self.params(real, images, len(images)), out=out)
        if out is None:
            out = torch.empty(shape, device=self.device)
        for spec, rows in ((real, ~synthetic), (other, synthetic)):
            index = rows.nonzero().flatten()
            if len(index):
                self.run(images.index_select(0, index.to(self.device)), self.params(spec, images, len(index)),
                         out=out, rows=index)
        return out

    def params(self, spec: ViewSpec, images: torch.Tensor, n: int) -> ViewParams:
        """``n`` samples of ``spec``'s parameters for crops of ``images``' size, from this backend's generator."""
        return sample_view_params(spec.recipe, n, images.shape[2], images.shape[3], spec.size, self.generator)


ViewBackend = PerImageViews | BatchedViews


def choose_backend(requested: str, device: torch.device, view_size: int) -> tuple[str, str]:
    """(backend, why): ``auto`` = the Triton kernels on CUDA when they load; on the CPU, the torch backend
    with hue compiled for views of at least ``compiled_ops.COMPILE_MIN_SIZE`` px when that compiles, else
    the torch backend. ``compiled`` is compiled here, so a failure is known before training."""
    if requested == "triton" and device.type != "cuda":
        raise ConfigError(f"train.augment_backend=triton needs a CUDA device; this run trains on {device.type} "
                          "(use torch)")
    if requested == "compiled":
        if device.type != "cpu":
            raise ConfigError(f"train.augment_backend=compiled is for CPUs; this run trains on {device.type} "
                              "(use triton or torch)")
        try:
            return "compiled", f"requested; hue compiled in {warm_up():.1f}s"
        except RuntimeError as e:
            raise ConfigError(f"train.augment_backend=compiled: {e} (use torch)") from e
    if requested == "triton":
        problem = triton_problem(device)
        if problem is not None:
            raise ConfigError(f"train.augment_backend=triton: the Triton kernels cannot make views here ({problem}); "
                              "use torch or auto")
        return "triton", "requested; a trial launch matched the torch backend"
    if requested != "auto":
        return requested, "requested"
    if device.type == "cpu":
        if view_size < COMPILE_MIN_SIZE:
            return "torch", f"auto: {view_size} px views on the CPU (hue is compiled from {COMPILE_MIN_SIZE} px)"
        try:
            return "compiled", f"auto: {view_size} px views on the CPU; hue compiled in {warm_up():.1f}s"
        except RuntimeError as e:
            return "torch", f"auto: on the CPU, and {e}"
    if device.type != "cuda":
        return "torch", f"auto: training on {device.type}, where the Triton kernels do not run"
    problem = triton_problem(device)
    if problem is not None:
        return "torch", f"auto: the Triton kernels cannot make views here ({problem})"
    return "triton", "auto: training on CUDA; a trial launch matched the torch backend"


TRIAL_RECIPE = ViewRecipe(blur_p=0.5, solarize_p=0.5)  # every kernel and every colour operation
TRIAL_TOLERANCE = 1e-3  # the kernels match the torch backend to about 2e-5 in float32


def triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot make views on ``device``, or None. Triton compiles at the first launch,
    with a C compiler, libcuda and ptxas: one launch on a small batch here, checked against the torch
    backend, finds a missing piece before training instead of at step 0 in the input-pipeline thread."""
    try:
        from onlinemix_kernels.augment import augment_views_triton

        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8, generator=generator)
        params = sample_view_params(TRIAL_RECIPE, len(images), 24, 24, 16, generator)
        ours = augment_views_triton(images.to(device), params, torch.float32).cpu()
        error = float((ours - augment_views(images, params)).abs().max())
    except Exception as e:  # ImportError, no driver, no compiler, a failed compilation
        return f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not error <= TRIAL_TOLERANCE:
        return f"a trial launch differs from the torch backend by {error:.3g}"
    return None


def make_backend(name: str, device: torch.device, seed: int) -> ViewBackend:
    """The view backend ``name`` (after ``choose_backend``); batched ones make views on ``device``."""
    return PerImageViews() if name == "torchvision" else BatchedViews(name, device, seed)


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
