"""Augmentation recipes: the composed v2 pipelines hold the paper's operations and parameters,
the no-augmentation mode only flips, and DINO multi-crop returns the right views from the right image."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from onlinemix.views.recipes import (
    IMAGENET_MIN_SCALE,
    TINY_MIN_SCALE,
    MixDiffDinoCrops,
    MultiCrop,
    augment_batch,
    augment_second_views,
    eval_transform,
    multicrop_sizes,
    simclr_views,
    view_recipe,
)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def ops(compose: v2.Compose) -> dict[str, tuple[v2.Transform, float]]:
    """Operation name -> (transform, probability); RandomApply unwrapped to its single inner op."""
    found: dict[str, tuple[v2.Transform, float]] = {}
    for t in compose.transforms:
        p = 1.0
        if isinstance(t, v2.RandomApply):
            assert len(t.transforms) == 1
            t, p = t.transforms[0], t.p
        elif hasattr(t, "p"):
            p = t.p
        assert type(t).__name__ not in found, f"{type(t).__name__} appears twice"
        found[type(t).__name__] = (t, p)
    return found


def describe(compose: v2.Compose) -> set[tuple]:
    """Comparable summary of every operation with its parameters."""
    out = set()
    for name, (t, p) in ops(compose).items():
        params = {k: v for k, v in vars(t).items() if not k.startswith("_") and k != "training"}
        out.add((name, p, repr(sorted(params.items()))))
    return out


@pytest.mark.parametrize("branch", ["real", "synthetic"])
def test_simclr_recipe_holds_the_stated_operations(branch: str) -> None:
    found = ops(view_recipe("simclr", 224, branch))
    crop, _ = found["RandomResizedCrop"]
    assert crop.size == (224, 224) and crop.scale == (IMAGENET_MIN_SCALE, 1.0) == (0.08, 1.0)
    assert found["RandomHorizontalFlip"][1] == 0.5
    jitter, p_jitter = found["ColorJitter"]
    assert p_jitter == 0.8
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == pytest.approx((-0.1, 0.1))
    assert found["RandomGrayscale"][1] == 0.2
    assert "Normalize" in found and "ToDtype" in found
    if branch == "real":
        blur, p_blur = found["GaussianBlur"]
        assert p_blur == 1.0  # BYOL's first branch: always blurred
        assert blur.kernel_size == (23, 23) and blur.sigma == [0.1, 2.0]
        assert "RandomSolarize" not in found
    else:
        solarize, p_solarize = found["RandomSolarize"]
        assert p_solarize == 0.2 and solarize.threshold == 0.5
        assert "GaussianBlur" not in found


def test_real_and_synthetic_branches_differ_exactly_by_blur_versus_solarise() -> None:
    real, synthetic = describe(view_recipe("simclr", 64, "real")), describe(view_recipe("simclr", 64, "synthetic"))
    assert {d[0] for d in real - synthetic} == {"GaussianBlur"}
    assert {d[0] for d in synthetic - real} == {"RandomSolarize"}
    # The order of the shared operations is the same too: geometry, to float, colour, then blur/solarise.
    names = [type(t).__name__ for t in view_recipe("simclr", 64, "real").transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "RandomApply", "RandomGrayscale",
                     "RandomApply", "Normalize"]


def test_min_scale_is_a_parameter_and_the_trainer_default_stays_tiny() -> None:
    assert ops(view_recipe("simclr", 32, "real", min_scale=0.3))["RandomResizedCrop"][0].scale == (0.3, 1.0)
    for synthetic in (False, True):
        assert ops(simclr_views(32, synthetic))["RandomResizedCrop"][0].scale == (TINY_MIN_SCALE, 1.0) == (0.2, 1.0)
    assert ops(simclr_views(224, False, IMAGENET_MIN_SCALE))["RandomResizedCrop"][0].scale == (0.08, 1.0)
    assert ops(simclr_views(32, True))["RandomSolarize"][1] == 0.2


def test_unknown_recipe_or_branch_is_refused() -> None:
    with pytest.raises(KeyError, match="no_augmentation"):
        view_recipe("byol", 32, "real")
    with pytest.raises(KeyError, match="branch"):
        view_recipe("simclr", 32, "fake")  # type: ignore[arg-type]


@pytest.mark.parametrize("branch", ["real", "synthetic"])
def test_no_augmentation_only_resizes_and_flips(branch: str) -> None:
    t = view_recipe("no_augmentation", 16, branch)
    assert [type(x).__name__ for x in t.transforms] == ["Resize", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    norm = eval_transform()
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    flipped = 0
    for img in images:
        out = t(img)
        if torch.equal(out, norm(img)):
            continue
        assert torch.equal(out, norm(img.flip(-1))), "output is neither the image nor its mirror"
        flipped += 1
    assert 0 < flipped < len(images)  # p 0.5: both outcomes occur


def test_no_augmentation_resizes_to_the_resolution() -> None:
    img = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    out = view_recipe("no_augmentation", 24, "real")(img)
    resized = v2.Resize((24, 24), antialias=True)(img)
    norm = eval_transform()
    assert torch.equal(out, norm(resized)) or torch.equal(out, norm(resized.flip(-1)))


def test_augment_batch_and_second_views_shapes_and_routing() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = augment_batch(simclr_views(16, synthetic=False), images)
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32
    real_t, syn_t = (lambda x: torch.zeros(1)), (lambda x: torch.ones(1))
    routed = augment_second_views(images, torch.tensor([True, False, False, True]), real_t, syn_t)
    assert routed.squeeze(1).tolist() == [1.0, 0.0, 0.0, 1.0]


# ----------------------------------------------------------------------------- DINO multi-crop


def test_multicrop_follows_dinos_recipe() -> None:
    mc = MultiCrop(224, 96, n_global=2, n_local=8)
    g1, g2, local = ops(mc.global_transforms[0]), ops(mc.global_transforms[1]), ops(mc.local_transform)
    assert g1["GaussianBlur"][1] == 1.0 and "RandomSolarize" not in g1
    assert g2["GaussianBlur"][1] == 0.1 and g2["RandomSolarize"][1] == 0.2
    assert local["GaussianBlur"][1] == 0.5 and "RandomSolarize" not in local
    for found, size, scale in ((g1, 224, (0.4, 1.0)), (g2, 224, (0.4, 1.0)), (local, 96, (0.05, 0.4))):
        crop = found["RandomResizedCrop"][0]
        assert crop.size == (size, size) and crop.scale == scale
        assert crop.interpolation == v2.InterpolationMode.BICUBIC
        assert found["ColorJitter"][1] == 0.8 and found["RandomGrayscale"][1] == 0.2


def test_multicrop_counts_and_sizes() -> None:
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    views = MultiCrop(224, 96, n_global=2, n_local=8)(images)
    assert len(views) == 10
    assert [tuple(v.shape) for v in views] == [(2, 3, 224, 224)] * 2 + [(2, 3, 96, 96)] * 8


def test_multicrop_scaled_down_sizes_for_the_tiny_setting() -> None:
    assert multicrop_sizes(224) == (224, 96)
    global_size, local_size = multicrop_sizes(32)
    assert (global_size, local_size) == (32, 14)
    views = MultiCrop(global_size, local_size, 2, 4)(torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert [v.shape[-1] for v in views] == [32, 32, 14, 14, 14, 14]


def test_mixdiff_dino_composition_counts_sizes_and_sources() -> None:
    real = torch.zeros(3, 3, 40, 40, dtype=torch.uint8)
    synthetic = torch.full((3, 3, 40, 40), 255, dtype=torch.uint8)
    crops = MixDiffDinoCrops(global_size=32, local_size=16, photometric=False)
    out = crops(real, synthetic)
    assert len(out.views) == 10 and out.n_global == 2 and len(out.globals) == 2
    assert [v.shape[-1] for v in out.views] == [32, 32] + [16] * 8
    assert all(v.shape[:2] == (3, 3) for v in out.views)
    assert out.sources == ("real", "synthetic") + ("real",) * 6 + ("synthetic",) * 2
    # Normalised black is negative everywhere, normalised white positive: each view names its source image.
    seen = tuple("real" if bool((v < 0).all()) else "synthetic" if bool((v > 0).all()) else "mixed" for v in out.views)
    assert seen == out.sources
    assert out.globals[0] is out.views[0] and out.globals[1] is out.views[1]


def test_mixdiff_dino_default_sizes_and_recipes() -> None:
    crops = MixDiffDinoCrops()
    real_g, syn_g, local = ops(crops.real_global), ops(crops.synthetic_global), ops(crops.local)
    assert real_g["RandomResizedCrop"][0].size == (224, 224) and local["RandomResizedCrop"][0].size == (96, 96)
    assert real_g["GaussianBlur"][1] == 1.0 and "RandomSolarize" not in real_g
    assert syn_g["RandomSolarize"][1] == 0.2 and syn_g["GaussianBlur"][1] == 0.1
    assert local["GaussianBlur"][1] == 0.5


def test_photometric_off_keeps_only_crop_and_flip() -> None:
    crops = MixDiffDinoCrops(32, 16, photometric=False)
    for t in (crops.real_global, crops.synthetic_global, crops.local):
        assert set(ops(t)) == {"RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"}
    mc = MultiCrop(32, 16, 2, 2, photometric=False)
    assert set(ops(mc.global_transforms[1])) == {"RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"}
