"""The Triton view kernels against the torch backend, which defines their meaning: the cases.

Run by ``tests/test_triton_augment.py`` in a child pytest: on CUDA as they are, elsewhere with
TRITON_INTERPRET=1 (Triton reads it when first imported, and torchvision imports Triton, so it must be
set before the process starts). Not collected on its own (no ``test_`` prefix).

Tolerance: float32 views within 2e-5 in normalised units, except for at most a 1e-4 fraction of values
(a value within rounding of the solarisation threshold may flip); fp16 / bf16 views within one unit in the
last place of the output dtype of the float32 reference (the interpreter truncates on the cast to bf16;
a GPU rounds to nearest). Resized pixels are exact in both: the same integer tables and integer sums.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from onlinemix.views.params import sample_view_params, view_generator  # noqa: E402
from onlinemix.views.recipes import DINO_GLOBAL_2, DINO_LOCAL, RECIPES  # noqa: E402
from onlinemix.views.torch_backend import augment_views  # noqa: E402
from onlinemix_kernels.augment import augment_views_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 2e-5
MAX_OUTLIERS = 1e-4
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # relative spacing of the output dtype


def assert_matches(ours: torch.Tensor, reference: torch.Tensor) -> None:
    off = (ours.float().cpu() - reference).abs()
    assert (off > ATOL).float().mean().item() <= MAX_OUTLIERS, off.max().item()


def run_both(recipe, batch: int, height: int, width: int, size: int, seed: int,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)
    params = sample_view_params(recipe, batch, height, width, size, view_generator(seed, 0, 0))
    return augment_views_triton(images.to(DEVICE), params, dtype).cpu(), augment_views(images, params)


CASES = {
    "mixdiff_real": RECIPES["simclr"]["real"],
    "mixdiff_synthetic_solarize_often": replace(RECIPES["simclr"]["synthetic"], solarize_p=0.5),
    "no_augmentation": RECIPES["no_augmentation"]["real"],
    "dino_global_2_bicubic": DINO_GLOBAL_2,
    "dino_local_downscaled": DINO_LOCAL,
    "hue_and_contrast_only": replace(RECIPES["simclr"]["synthetic"], jitter=(0.0, 0.4, 0.0, 0.5), jitter_p=1.0),
}


@pytest.mark.parametrize("name", CASES)
def test_float32_views_match_the_torch_backend(name: str) -> None:
    ours, reference = run_both(CASES[name], batch=6, height=26, width=22, size=16, seed=1)
    assert_matches(ours, reference)


@pytest.mark.parametrize("batch,height,width,size", [(1, 9, 9, 9), (3, 31, 17, 13), (2, 12, 12, 29)])
def test_edge_shapes(batch: int, height: int, width: int, size: int) -> None:
    """A batch of one, odd and non-square sources, upscaling past the source."""
    ours, reference = run_both(RECIPES["simclr"]["real"], batch, height, width, size, seed=size)
    assert_matches(ours, reference)


def test_crops_touching_every_border() -> None:
    """Scale 1.0 boxes span the whole short side; the long side is cropped at random offsets."""
    recipe = replace(RECIPES["simclr"]["synthetic"], crop_scale=(1.0, 1.0))
    ours, reference = run_both(recipe, batch=5, height=12, width=15, size=10, seed=3)
    assert_matches(ours, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_views_within_one_ulp(dtype: torch.dtype) -> None:
    """Bright and dark images push the normalised values to their extremes (-2.1 .. 2.6)."""
    recipe = replace(RECIPES["simclr"]["synthetic"], solarize_p=0.5)
    ours, reference = run_both(recipe, batch=4, height=14, width=14, size=14, seed=4, dtype=dtype)
    assert ours.dtype == dtype
    assert ((ours.float() - reference).abs() <= reference.abs() * ULP[dtype] + ATOL).all()
    extremes = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    extremes[1] = 255
    params = sample_view_params(RECIPES["no_augmentation"]["real"], 2, 8, 8, 8, view_generator(0, 0, 0))
    ours = augment_views_triton(extremes.to(DEVICE), params, dtype).cpu().float()
    reference = augment_views(extremes, params)
    assert ((ours - reference).abs() <= reference.abs() * ULP[dtype]).all()


def test_wrong_inputs_are_refused() -> None:
    params = sample_view_params(RECIPES["simclr"]["real"], 1, 8, 8, 8, view_generator(0, 0, 0))
    with pytest.raises(ValueError, match="uint8"):
        augment_views_triton(torch.zeros(1, 3, 8, 8, device=DEVICE), params)
    with pytest.raises(ValueError, match="dtype"):
        augment_views_triton(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=DEVICE), params, torch.int8)


def test_the_trial_launch_that_chooses_triton_passes_where_the_kernels_run() -> None:
    """What ``train.augment_backend`` runs before choosing the kernels (here on the interpreter's CPU)."""
    from onlinemix.views.backends import triton_problem

    assert triton_problem(torch.device("cpu")) is None
