"""View sets as data for the batched backends: which recipe, at which size, from which source image.

augment.py builds the same sets as v2 pipelines (`simclr_views`, `MultiCrop`, `MixDiffDinoCrops`); here
each view is a `ViewSpec`, so a views module can draw `ViewParams` per spec and run any backend. The
constructors mirror augment.py's arguments and recipes (tests check counts, sizes and sources against it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from onlinemix.views.params import ViewParams, sample_view_params
from onlinemix.views.recipes import (
    DINO_GLOBAL_1,
    DINO_GLOBAL_2,
    DINO_LOCAL,
    RECIPES,
    TINY_MIN_SCALE,
    Branch,
    ViewRecipe,
)


@dataclass(frozen=True)
class ViewSpec:
    recipe: ViewRecipe
    size: int
    source: Branch  # which image of the pair the view is cropped from


def _crop(recipe: ViewRecipe, scale: tuple[float, float], size: int, photometric: bool, source: Branch) -> ViewSpec:
    recipe = replace(recipe, crop_scale=scale)
    return ViewSpec(recipe if photometric else recipe.geometric_only(), size, source)


def pair_specs(name: str, resolution: int, min_scale: float | None = TINY_MIN_SCALE) -> tuple[ViewSpec, ViewSpec]:
    """The two views of a pair under augment.view_recipe's `name` recipe: real branch, synthetic branch."""
    def spec(branch: Branch) -> ViewSpec:
        recipe = RECIPES[name][branch]
        if min_scale is not None and recipe.crop_scale is not None:
            recipe = replace(recipe, crop_scale=(min_scale, recipe.crop_scale[1]))
        return ViewSpec(recipe, resolution, branch)
    return spec("real"), spec("synthetic")


def multicrop_specs(global_size: int, local_size: int, n_global: int = 2, n_local: int = 8,
                    global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                    photometric: bool = True, source: Branch = "real") -> tuple[ViewSpec, ...]:
    """augment.MultiCrop: globals alternating DINO's two global recipes, then the locals, all from `source`."""
    globals_ = [_crop((DINO_GLOBAL_1, DINO_GLOBAL_2)[i % 2], global_scale, global_size, photometric, source)
                for i in range(n_global)]
    return tuple(globals_) + (_crop(DINO_LOCAL, local_scale, local_size, photometric, source),) * n_local


def mixdiff_dino_specs(global_size: int = 224, local_size: int = 96, n_real_local: int = 6,
                       n_synthetic_local: int = 2, global_scale: tuple[float, float] = (0.4, 1.0),
                       local_scale: tuple[float, float] = (0.05, 0.4), photometric: bool = True
                       ) -> tuple[ViewSpec, ...]:
    """augment.MixDiffDinoCrops: [real global, synthetic global, real locals..., synthetic locals...]."""
    return ((_crop(DINO_GLOBAL_1, global_scale, global_size, photometric, "real"),
             _crop(DINO_GLOBAL_2, global_scale, global_size, photometric, "synthetic"))
            + (_crop(DINO_LOCAL, local_scale, local_size, photometric, "real"),) * n_real_local
            + (_crop(DINO_LOCAL, local_scale, local_size, photometric, "synthetic"),) * n_synthetic_local)


def sample_specs(specs: tuple[ViewSpec, ...], batch: int, height: int, width: int,
                 generator: torch.Generator) -> list[ViewParams]:
    """One `ViewParams` per spec, drawn in order from one generator."""
    return [sample_view_params(spec.recipe, batch, height, width, spec.size, generator) for spec in specs]
