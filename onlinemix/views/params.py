"""Per-sample random parameters of a batch of views, drawn from the distributions torchvision v2 uses.

`augment.build_transform` draws one set of parameters per `v2.Compose` call, i.e. per image. The batched
backends (`batch_augment`, `onlinemix_kernels.augment`) take them as tensors instead, drawn here for the
whole batch at once from the same distributions:

* RandomResizedCrop: area fraction uniform in `crop_scale`, log aspect ratio uniform in log(3/4, 4/3),
  sides rounded half to even, up to 10 tries for a box that fits, else the centre crop clamped to the
  ratio range; position uniform over the valid offsets. `crop_scale=None` resizes the whole image.
* RandomHorizontalFlip(p); RandomApply(ColorJitter, p) with a uniformly random order of the four
  operations (ColorJitter's `randperm(4)`) and each factor uniform in ColorJitter's own range (read from a
  `v2.ColorJitter` built from the recipe, so disabled operations match too); RandomGrayscale(p);
  RandomApply(GaussianBlur, p) with sigma uniform in the recipe's range; RandomSolarize(p).

Draws come from one `torch.Generator` (CPU), so a (seed, rank, step) triple gives the same views on any
device. The stream differs from torchvision's per-image stream; the distributions are the same
(tests/test_view_params.py compares them with Kolmogorov-Smirnov and chi-square tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torchvision.transforms import v2

from onlinemix.views.recipes import ViewRecipe, blur_kernel_size

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default, which the recipes keep
CROP_TRIES = 10
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's operation ids (its fn_idx)
INTERPOLATIONS = {v2.InterpolationMode.BILINEAR: "bilinear", v2.InterpolationMode.BICUBIC: "bicubic"}


@dataclass(frozen=True)
class ViewParams:
    """One batch of views: per-sample tensors (leading dimension B) and the settings shared by the batch.

    Factors of operations a sample does not get hold their identity value (1, or 0 for hue).
    """

    size: int                        # output side S
    interpolation: str               # "bilinear" | "bicubic"
    blur_kernel: int                 # GaussianBlur's kernel size for this size
    jitter_ops: tuple[bool, ...]     # which of ColorJitter's four operations the recipe enables
    top: torch.Tensor                # (B,) int64: crop box in source pixels
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor               # (B,) bool
    jitter: torch.Tensor             # (B,) bool: ColorJitter applied
    order: torch.Tensor              # (B, 4) int64: ColorJitter's operation order (a permutation of 0..3)
    brightness: torch.Tensor         # (B,) float32 factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor          # (B,) bool
    blur: torch.Tensor               # (B,) bool
    sigma: torch.Tensor              # (B,) float32
    solarize: torch.Tensor           # (B,) bool

    @property
    def batch(self) -> int:
        return self.top.shape[0]

    def _map(self, fn) -> ViewParams:
        return replace(self, **{name: fn(getattr(self, name)) for name in _TENSOR_FIELDS})

    def select(self, index: torch.Tensor) -> ViewParams:
        """The samples at `index` (int64), in that order."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def narrow(self, start: int, length: int) -> ViewParams:
        """Samples start .. start + length - 1 (views, no copy)."""
        return self._map(lambda t: t.narrow(0, start, length))

    def to(self, device: torch.device | str) -> ViewParams:
        return self._map(lambda t: t.to(device))

    def factors(self) -> torch.Tensor:
        """(B, 4) float32: brightness, contrast, saturation, hue, indexed by operation id."""
        return torch.stack([self.brightness, self.contrast, self.saturation, self.hue], dim=1)


_TENSOR_FIELDS = tuple(f.name for f in fields(ViewParams) if f.type == "torch.Tensor")


def view_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator for one rank's views at one step: reproducible, and independent across the triples."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) | (int(state[1]) << 32))


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _coin(p: float, batch: int, generator: torch.Generator) -> torch.Tensor:
    """v2's RandomApply / _RandomApplyTransform: applied when rand < p."""
    return torch.rand(batch, generator=generator) < p


def sample_crops(scale: tuple[float, float] | None, batch: int, height: int, width: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop.make_params for a batch: (top, left, height, width), each (B,) int64."""
    if scale is None:
        zero = torch.zeros(batch, dtype=torch.int64)
        return zero, zero.clone(), torch.full_like(zero, height), torch.full_like(zero, width)
    area = height * width
    target_area = area * _uniform(scale[0], scale[1], (batch, CROP_TRIES), generator)
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    aspect = torch.exp(_uniform(*log_ratio, (batch, CROP_TRIES), generator))
    w = torch.round(torch.sqrt(target_area * aspect)).to(torch.int64)  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target_area / aspect)).to(torch.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    w_fallback, h_fallback = _centre_crop_size(height, width)
    w = torch.where(found, w, torch.full_like(w, w_fallback))
    h = torch.where(found, h, torch.full_like(h, h_fallback))
    u_top, u_left = torch.rand((2, batch), generator=generator, dtype=torch.float64)
    top = torch.where(found, (u_top * (height - h + 1)).to(torch.int64), (height - h) // 2)
    left = torch.where(found, (u_left * (width - w + 1)).to(torch.int64), (width - w) // 2)
    return top, left, h, w


def _centre_crop_size(height: int, width: int) -> tuple[int, int]:
    """RandomResizedCrop's fallback box (width, height) when no try fits."""
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        return width, int(round(width / min(CROP_RATIO)))
    if in_ratio > max(CROP_RATIO):
        return int(round(height * max(CROP_RATIO))), height
    return width, height


def sample_view_params(recipe: ViewRecipe, batch: int, height: int, width: int, size: int,
                       generator: torch.Generator) -> ViewParams:
    """Draw `batch` views of `recipe` at output side `size` from (height, width) sources."""
    if recipe.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unsupported interpolation {recipe.interpolation}; known: {list(INTERPOLATIONS)}")
    top, left, h, w = sample_crops(recipe.crop_scale, batch, height, width, generator)
    flip = _coin(recipe.flip_p, batch, generator)
    jitter_ranges = _jitter_ranges(recipe)
    jitter = _coin(recipe.jitter_p, batch, generator) & any(r is not None for r in jitter_ranges)
    order = torch.rand((batch, 4), generator=generator).argsort(dim=1)  # a uniform random permutation
    factors = [torch.full((batch,), 0.0 if op == HUE else 1.0) if r is None
               else _uniform(r[0], r[1], (batch,), generator).to(torch.float32)
               for op, r in enumerate(jitter_ranges)]
    grayscale = _coin(recipe.grayscale_p, batch, generator)
    blur = _coin(recipe.blur_p, batch, generator)
    sigma = _uniform(*recipe.blur_sigma, (batch,), generator).to(torch.float32)
    solarize = _coin(recipe.solarize_p, batch, generator)
    return ViewParams(
        size=size, interpolation=INTERPOLATIONS[recipe.interpolation], blur_kernel=blur_kernel_size(size),
        jitter_ops=tuple(r is not None for r in jitter_ranges), top=top, left=left, height=h, width=w,
        flip=flip, jitter=jitter, order=order, brightness=factors[BRIGHTNESS], contrast=factors[CONTRAST],
        saturation=factors[SATURATION], hue=factors[HUE], grayscale=grayscale, blur=blur, sigma=sigma,
        solarize=solarize)


def _jitter_ranges(recipe: ViewRecipe) -> list[tuple[float, float] | None]:
    """ColorJitter's factor ranges for the recipe (None: operation disabled), as v2.ColorJitter parses them."""
    if recipe.jitter_p <= 0:
        return [None] * 4
    cj = v2.ColorJitter(*recipe.jitter)
    return [cj.brightness, cj.contrast, cj.saturation, cj.hue]
