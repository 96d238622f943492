"""The batched parameter sampler against torchvision v2's own per-call sampling.

Each distribution is drawn N times from v2 (its `make_params` / RandomApply coin, seeded through torch's
global RNG) and N times from `sample_view_params`, and compared with a two-sample Kolmogorov-Smirnov test
(continuous and ordinal values) or a chi-square test of homogeneity (categories), at fixed seeds and a
1e-3 significance level. A control test checks that the same tests do reject a slightly wrong sampler.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torchvision.transforms import v2

from onlinemix.views.params import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    sample_crops,
    sample_view_params,
    view_generator,
)
from onlinemix.views.recipes import RECIPES, ViewRecipe

N = 10_000
ALPHA = 1e-3
N_COIN = 2_000  # v2 transform calls per coin (each call runs the transform)
SEED = 20_240_601  # torchvision's draws use SEED + i, ours view_generator(i, 0, 0)


def ks_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov test, asymptotic p-value (conservative for discrete values)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    d = ((torch.searchsorted(a, grid, right=True) / len(a)) - (torch.searchsorted(b, grid, right=True) / len(b)))
    stat = d.abs().max().item()
    n = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * stat
    if lam < 0.3:  # the series below does not converge there; Q_KS(0.3) > 0.9999
        return 1.0
    return max(0.0, min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))))


def chi2_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square test that two samples of category ids come from the same distribution."""
    cats = torch.unique(torch.cat([a, b]))
    table = torch.stack([(a[:, None] == cats).sum(0), (b[:, None] == cats).sum(0)]).double()
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = len(cats) - 1
    return 1.0 if dof == 0 else torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2).item()


def torchvision_crops(scale: tuple[float, float], height: int, width: int, seed: int) -> torch.Tensor:
    torch.manual_seed(SEED + seed)
    crop = v2.RandomResizedCrop(8, scale=scale, antialias=True)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    rows = [crop.make_params([image]) for _ in range(N)]
    return torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in rows])


def batched_crops(scale: tuple[float, float], height: int, width: int, seed: int) -> torch.Tensor:
    return torch.stack(sample_crops(scale, N, height, width, view_generator(seed, 0, 0)), dim=1)


@pytest.mark.parametrize("scale,height,width", [
    ((0.08, 1.0), 224, 224),   # the ImageNet recipe
    ((0.05, 0.4), 48, 64),     # DINO locals on a landscape image
    ((0.9, 1.0), 10, 100),     # most tries fail: the centre-crop fallback decides most boxes
])
def test_crop_boxes_follow_random_resized_crop(scale, height, width) -> None:
    ours, theirs = batched_crops(scale, height, width, 1), torchvision_crops(scale, height, width, 2)
    for column, name in enumerate(("top", "left", "height", "width")):
        assert ks_pvalue(ours[:, column], theirs[:, column]) > ALPHA, name
    area_ours = (ours[:, 2] * ours[:, 3]).double()
    area_theirs = (theirs[:, 2] * theirs[:, 3]).double()
    assert ks_pvalue(area_ours, area_theirs) > ALPHA
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert (ours >= 0).all() and (ours[:, 2:] > 0).all()


def test_the_tests_reject_a_slightly_wrong_crop_scale() -> None:
    """Control: the KS test at this N sees a lower bound of 0.12 instead of 0.08."""
    ours = batched_crops((0.12, 1.0), 224, 224, 1)
    theirs = torchvision_crops((0.08, 1.0), 224, 224, 2)
    areas = [(c[:, 2] * c[:, 3]).double() for c in (ours, theirs)]
    assert ks_pvalue(*areas) < ALPHA


def test_fallback_is_torchvisions_centre_crop() -> None:
    ours = batched_crops((1.0, 1.0), 10, 100, 0)  # aspect 10 > 4/3: no try fits, ever
    assert (ours == torch.tensor([0, (100 - 13) // 2, 10, 13])).all()
    assert (torchvision_crops((1.0, 1.0), 10, 100, 0)[0] == ours[0]).all()


def test_resize_only_recipe_takes_the_whole_image() -> None:
    params = sample_view_params(RECIPES["no_augmentation"]["real"], 16, 40, 30, 32, torch.Generator())
    assert (params.top == 0).all() and (params.left == 0).all()
    assert (params.height == 40).all() and (params.width == 30).all()
    assert not params.jitter.any() and not params.grayscale.any() and not params.blur.any()


def torchvision_jitter(recipe: ViewRecipe, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED + seed)
    jitter = v2.ColorJitter(*recipe.jitter)
    rows = [jitter.make_params([]) for _ in range(N)]
    orders = torch.stack([r["fn_idx"] for r in rows])
    return {"order": orders, **{k: torch.tensor([r[f"{k}_factor"] for r in rows])
                                for k in ("brightness", "contrast", "saturation", "hue")}}


def permutation_ids(orders: torch.Tensor) -> torch.Tensor:
    return (orders * torch.tensor([64, 16, 4, 1])).sum(1)


def test_colour_jitter_order_and_factors_follow_color_jitter() -> None:
    recipe = RECIPES["simclr"]["synthetic"]
    params = sample_view_params(recipe, N, 32, 32, 32, view_generator(3, 0, 0))
    theirs = torchvision_jitter(recipe, 4)
    assert chi2_pvalue(permutation_ids(params.order), permutation_ids(theirs["order"])) > ALPHA
    assert len(torch.unique(permutation_ids(params.order))) == 24
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert ks_pvalue(getattr(params, name), theirs[name]) > ALPHA, name
    assert params.jitter_ops == (True, True, True, True)


def test_disabled_jitter_operations_keep_identity_factors() -> None:
    recipe = replace(RECIPES["simclr"]["synthetic"], jitter=(0.4, 0.0, 0.0, 0.1))
    params = sample_view_params(recipe, 64, 32, 32, 32, torch.Generator())
    assert params.jitter_ops == (True, False, False, True)
    factors = params.factors()
    assert (factors[:, CONTRAST] == 1).all() and (factors[:, SATURATION] == 1).all()
    assert factors[:, BRIGHTNESS].std() > 0 and factors[:, HUE].std() > 0


def test_blur_sigma_follows_gaussian_blur() -> None:
    torch.manual_seed(SEED + 5)
    blur = v2.GaussianBlur(23, sigma=(0.1, 2.0))
    theirs = torch.tensor([blur.make_params([])["sigma"][0] for _ in range(N)])
    params = sample_view_params(RECIPES["simclr"]["real"], N, 224, 224, 224, view_generator(6, 0, 0))
    assert ks_pvalue(params.sigma, theirs) > ALPHA
    assert params.blur_kernel == 23 and params.interpolation == "bilinear"


def coin_outcomes(transform: v2.Transform, seed: int) -> torch.Tensor:
    """(N,) 0/1: whether a v2 random-apply transform changed its input, call by call."""
    torch.manual_seed(SEED + seed)
    image = torch.rand(3, 4, 4)
    return torch.tensor([not torch.equal(transform(image), image) for _ in range(N_COIN)], dtype=torch.long)


def test_coins_match_v2_probabilities() -> None:
    recipe = replace(RECIPES["simclr"]["synthetic"], blur_p=0.5)
    params = sample_view_params(recipe, N, 32, 32, 32, view_generator(7, 0, 0))
    transforms = {
        "flip": v2.RandomHorizontalFlip(recipe.flip_p),
        "jitter": v2.RandomApply([v2.ColorJitter(brightness=(2.0, 2.0))], p=recipe.jitter_p),
        "grayscale": v2.RandomGrayscale(recipe.grayscale_p),
        "blur": v2.RandomApply([v2.GaussianBlur(3, sigma=(1.0, 1.0))], p=recipe.blur_p),
        "solarize": v2.RandomSolarize(0.0, p=recipe.solarize_p),
    }
    for i, (name, transform) in enumerate(transforms.items()):
        ours = getattr(params, name).long()
        assert chi2_pvalue(ours, coin_outcomes(transform, 10 + i)) > ALPHA, name
        assert abs(ours.double().mean().item() - getattr(recipe, f"{name}_p")) < 4 * math.sqrt(0.25 / N), name


def test_parameters_are_reproducible_per_seed_rank_and_step() -> None:
    recipe = RECIPES["simclr"]["real"]
    draw = lambda *key: sample_view_params(recipe, 32, 64, 64, 32, view_generator(*key))  # noqa: E731
    a, b, other_step, other_rank = draw(0, 1, 2), draw(0, 1, 2), draw(0, 1, 3), draw(0, 2, 2)
    for name in ("top", "left", "height", "width", "flip", "order", "hue", "sigma", "grayscale"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.top, other_step.top) and not torch.equal(a.top, other_rank.top)
