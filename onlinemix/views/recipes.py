"""View augmentations (torchvision.transforms.v2) applied per image to uint8 batches.

Recipes are data (`ViewRecipe`), turned into v2 pipelines by `build_transform`, so the paper's
settings can be read, compared and tested instead of being hidden in code branches.

v2 transforms draw one set of random parameters per call, so a batch tensor would get
the same crop for every image; SSL needs independent views, hence one call per image.

The MixDiff recipe (`simclr`) is SimCLR's augmentation made asymmetric as in BYOL: the real
branch always gets Gaussian blur (p 1.0, BYOL's first branch) and never solarisation; the
synthetic branch gets solarisation (p 0.2) instead of blur. The MixDiff paper
names "Gaussian blur" on the real branch without a probability; p 1.0 is BYOL's value for the
branch that has blur and no solarisation, which is what the paper's split describes.

DINO multi-crop follows DINO's official `DataAugmentationDINO`: global view 1 blur p 1.0, global
view 2 blur p 0.1 + solarisation p 0.2, local views blur p 0.5, bicubic crops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MIN_SCALE = 0.08  # SimCLR/BYOL RandomResizedCrop lower bound on ImageNet
TINY_MIN_SCALE = 0.2       # the tiny digits setting: 8x8 sources upscaled lose the digit below this
SOLARIZE_THRESHOLD = 0.5   # on [0, 1] floats; PIL's 128 on uint8 inverts the same pixels

Branch = Literal["real", "synthetic"]
BRANCHES: tuple[Branch, ...] = ("real", "synthetic")


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation; an operation with probability 0 is left out of the pipeline.

    `crop_scale` None resizes the whole image to the resolution instead of cropping.
    """

    crop_scale: tuple[float, float] | None = (IMAGENET_MIN_SCALE, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR

    def geometric_only(self) -> ViewRecipe:
        """The same crop and flip without colour, blur or solarisation (the paper's no-augmentation ablation)."""
        return replace(self, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


_SIMCLR_REAL = ViewRecipe(blur_p=1.0)
_SIMCLR_SYNTHETIC = ViewRecipe(solarize_p=0.2)
_NO_AUGMENTATION = ViewRecipe(crop_scale=None, jitter_p=0.0, grayscale_p=0.0)

RECIPES: dict[str, dict[Branch, ViewRecipe]] = {
    "simclr": {"real": _SIMCLR_REAL, "synthetic": _SIMCLR_SYNTHETIC},
    "no_augmentation": {"real": _NO_AUGMENTATION, "synthetic": _NO_AUGMENTATION},
}

_DINO_CROP = ViewRecipe(interpolation=v2.InterpolationMode.BICUBIC)
DINO_GLOBAL_1 = replace(_DINO_CROP, crop_scale=(0.4, 1.0), blur_p=1.0)
DINO_GLOBAL_2 = replace(_DINO_CROP, crop_scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2)
DINO_LOCAL = replace(_DINO_CROP, crop_scale=(0.05, 0.4), blur_p=0.5)


def blur_kernel_size(resolution: int) -> int:
    """About 10% of the side, odd (SimCLR's choice: 23 at 224)."""
    return max(3, (resolution // 10) | 1)


def build_transform(recipe: ViewRecipe, resolution: int) -> v2.Compose:
    """uint8 (3, H, W) -> normalised float (3, R, R). Geometry runs on uint8, the rest on floats."""
    ops: list[v2.Transform] = []
    if recipe.crop_scale is None:
        ops.append(v2.Resize((resolution, resolution), interpolation=recipe.interpolation, antialias=True))
    else:
        ops.append(v2.RandomResizedCrop(resolution, scale=recipe.crop_scale, interpolation=recipe.interpolation,
                                        antialias=True))
    if recipe.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(recipe.flip_p))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if recipe.jitter_p > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(*recipe.jitter)], p=recipe.jitter_p))
    if recipe.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(recipe.grayscale_p))
    if recipe.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(resolution), sigma=recipe.blur_sigma)
        ops.append(v2.RandomApply([blur], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=recipe.solarize_p))
    ops.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(ops)


def view_recipe(name: str, resolution: int, branch: Branch, min_scale: float | None = None) -> v2.Compose:
    """The named recipe's pipeline for one branch; `min_scale` overrides the crop's lower bound.

    The registered `simclr` recipe crops with the ImageNet bound (0.08); pass TINY_MIN_SCALE for tiny images.
    """
    if name not in RECIPES:
        raise KeyError(f"unknown augmentation recipe {name!r}; known: {sorted(RECIPES)}")
    if branch not in BRANCHES:
        raise KeyError(f"unknown branch {branch!r}; known: {BRANCHES}")
    recipe = RECIPES[name][branch]
    if min_scale is not None and recipe.crop_scale is not None:
        recipe = replace(recipe, crop_scale=(min_scale, recipe.crop_scale[1]))
    return build_transform(recipe, resolution)


def simclr_views(resolution: int, synthetic: bool, min_scale: float = TINY_MIN_SCALE) -> v2.Compose:
    """The trainer's entry point: the MixDiff/SimCLR recipe, tiny crop bound unless told otherwise."""
    return view_recipe("simclr", resolution, "synthetic" if synthetic else "real", min_scale)


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def augment_batch(transform: v2.Compose, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, R, R), each image with its own random parameters."""
    return torch.stack([transform(img) for img in images])


def augment_second_views(images: torch.Tensor, is_synthetic: torch.Tensor, real_transform: v2.Compose,
                         synthetic_transform: v2.Compose) -> torch.Tensor:
    """Second branch: synthetic views get the synthetic recipe, real fallbacks the real one."""
    return torch.stack([(synthetic_transform if syn else real_transform)(img)
                        for img, syn in zip(images, is_synthetic.tolist())])


def _crop_transform(recipe: ViewRecipe, scale: tuple[float, float], size: int, photometric: bool) -> v2.Compose:
    recipe = replace(recipe, crop_scale=scale)
    return build_transform(recipe if photometric else recipe.geometric_only(), size)


class MultiCrop:
    """DINO multi-crop of one image batch: `n_global` global then `n_local` local view batches.

    Global view i uses DINO's global recipe i % 2 (blur p 1.0, then blur p 0.1 + solarise p 0.2);
    locals use blur p 0.5. `photometric=False` keeps only crops and flips (no-augmentation ablation).
    """

    def __init__(self, global_size: int, local_size: int, n_global: int = 2, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 photometric: bool = True) -> None:
        self.global_transforms = [_crop_transform((DINO_GLOBAL_1, DINO_GLOBAL_2)[i % 2], global_scale, global_size,
                                                  photometric) for i in range(n_global)]
        self.local_transform = _crop_transform(DINO_LOCAL, local_scale, local_size, photometric)
        self.n_global = n_global
        self.n_local = n_local

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 (B, 3, H, W) -> n_global batches (B, 3, G, G), then n_local batches (B, 3, L, L)."""
        return ([augment_batch(t, images) for t in self.global_transforms]
                + [augment_batch(self.local_transform, images) for _ in range(self.n_local)])


@dataclass
class MultiCropViews:
    """Views in order; the first `n_global` are the globals, the teacher's inputs (the student sees all)."""

    views: list[torch.Tensor]
    n_global: int
    sources: tuple[Branch, ...]  # which image each view was cropped from

    @property
    def globals(self) -> list[torch.Tensor]:
        return self.views[:self.n_global]


class MixDiffDinoCrops:
    """DINO + MixDiff view composition: 1 global + 6 local from the real image, 1 global + 2 local
    from its synthetic variation (the paper's split of DINO's 2 global + 8 local).

    Order: [real_global, synthetic_global, real_locals..., synthetic_locals...], so the teacher's
    inputs are the first two views, as in DINO's own ordering. The real global uses DINO's global
    recipe 1 (blur), the synthetic global recipe 2 (solarisation), matching MixDiff's branch split.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_real_local: int = 6,
                 n_synthetic_local: int = 2, global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4), photometric: bool = True) -> None:
        self.real_global = _crop_transform(DINO_GLOBAL_1, global_scale, global_size, photometric)
        self.synthetic_global = _crop_transform(DINO_GLOBAL_2, global_scale, global_size, photometric)
        self.local = _crop_transform(DINO_LOCAL, local_scale, local_size, photometric)
        self.n_real_local = n_real_local
        self.n_synthetic_local = n_synthetic_local

    @property
    def sources(self) -> tuple[Branch, ...]:
        return (("real", "synthetic") + ("real",) * self.n_real_local
                + ("synthetic",) * self.n_synthetic_local)

    def __call__(self, real: torch.Tensor, synthetic: torch.Tensor) -> MultiCropViews:
        """Two uint8 (B, 3, H, W) batches, row i of `synthetic` a variation of row i of `real`."""
        views = ([augment_batch(self.real_global, real), augment_batch(self.synthetic_global, synthetic)]
                 + [augment_batch(self.local, real) for _ in range(self.n_real_local)]
                 + [augment_batch(self.local, synthetic) for _ in range(self.n_synthetic_local)])
        return MultiCropViews(views, 2, self.sources)


def multicrop_sizes(resolution: int) -> tuple[int, int]:
    """DINO's 224/96 global/local sizes, scaled to a smaller training resolution (locals at 3/7)."""
    return resolution, max(8, round(resolution * 96 / 224))

