"""The plain-torch batched backend against torchvision.transforms.v2.functional, op by op and composed.

Tolerances (normalised units, i.e. after dividing by the ImageNet std ~0.225): the resize is exact (on
CPUs where torchvision resizes uint8 natively; one level elsewhere); every float operation within 1e-5 of
torchvision's (float32 rounding; hue differs most, its closed form regroups the arithmetic).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from onlinemix.views.compiled import warm_up
from onlinemix.views.params import ViewParams, sample_view_params, view_generator
from onlinemix.views.photometric import (
    adjust_brightness_,
    adjust_contrast_,
    adjust_hue_,
    adjust_saturation_,
    gaussian_blur,
    normalize_,
    solarize_,
    to_grayscale_,
)
from onlinemix.views.recipes import (
    DINO_GLOBAL_2,
    DINO_LOCAL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    SOLARIZE_THRESHOLD,
    MixDiffDinoCrops,
    MultiCrop,
)
from onlinemix.views.resample import resample, resample_table, resized_crops, uses_native_uint8_path
from onlinemix.views.specs import mixdiff_dino_specs, multicrop_specs, pair_specs, sample_specs
from onlinemix.views.torch_backend import augment_views, sample_groups

FLOAT_ATOL = 1e-5
MODES = {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC}


def torchvision_view(image: torch.Tensor, p: ViewParams, i: int) -> torch.Tensor:
    """Sample i's view composed from torchvision's functional ops, in build_transform's order."""
    x = F.resized_crop(image, int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]), [p.size, p.size],
                       interpolation=MODES[p.interpolation], antialias=True)
    if p.flip[i]:
        x = F.horizontal_flip(x)
    x = F.to_dtype(x, torch.float32, scale=True)
    if p.jitter[i]:
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for op in p.order[i].tolist():
            if p.jitter_ops[op]:
                x = ops[op](x, float(p.factors()[i, op]))
    if p.grayscale[i]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        x = F.gaussian_blur(x, [p.blur_kernel] * 2, [float(p.sigma[i])] * 2)
    if p.solarize[i]:
        x = F.solarize(x, SOLARIZE_THRESHOLD)
    return F.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (noise on gradients), so resampling and blurs act on structure, not pure noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, width).expand(height, width) * torch.rand(batch, 3, 1, 1, generator=g)
    noise = torch.randint(-40, 41, (batch, 3, height, width), generator=g)
    return (ramp + noise).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- resize


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height,width,size", [(64, 64, 64), (64, 48, 24), (33, 37, 17), (20, 24, 40), (96, 96, 8)])
def test_resize_equals_torchvision_uint8(interpolation: str, height: int, width: int, size: int) -> None:
    batch = 12
    g = torch.Generator().manual_seed(size)
    x = images(batch, height, width, seed=size)
    h = torch.randint(1, height + 1, (batch,), generator=g)
    w = torch.randint(1, width + 1, (batch,), generator=g)
    h[:2], w[:2] = height, width  # the whole image (and its corners below): boxes touching every border
    top = (torch.rand(batch, generator=g) * (height - h + 1)).long()
    left = (torch.rand(batch, generator=g) * (width - w + 1)).long()
    top[2], left[2], h[2], w[2] = height - 1, width - 1, 1, 1  # a one-pixel crop in the far corner
    flip = torch.arange(batch) % 2 == 1
    rows = resample_table(top, h, size, interpolation)
    cols = resample_table(left, w, size, interpolation, reverse=flip)
    ours = resample(x, rows, cols)
    assert torch.equal(ours, ours.round().clamp(0, 255))  # levels: integers in [0, 255]
    theirs = torch.stack([F.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size],
                                         interpolation=MODES[interpolation], antialias=True) for i in range(batch)])
    theirs = torch.where(flip.view(-1, 1, 1, 1), theirs.flip(-1), theirs)
    if uses_native_uint8_path(interpolation):
        assert torch.equal(ours.to(torch.uint8), theirs)
    else:
        assert (ours - theirs.float()).abs().max() <= 1


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("kind,size", [("own", 13), ("shared", 13), ("whole", 20)])
def test_resized_crops_are_torchvisions_and_leave_the_sources_alone(interpolation: str, kind: str, size: int) -> None:
    """Each sample's box, one box for all (one batched call) and the whole image at its own size (no resize)."""
    x = images(6, 20, 20, seed=3)
    before = x.clone()
    g = torch.Generator().manual_seed(4)
    h, w = torch.randint(1, 21, (6,), generator=g), torch.randint(1, 21, (6,), generator=g)
    boxes = torch.stack([(torch.rand(6, generator=g) * (20 - h + 1)).long(),
                         (torch.rand(6, generator=g) * (20 - w + 1)).long(), h, w], dim=1)
    if kind != "own":
        boxes[:] = torch.tensor([2, 3, 15, 17] if kind == "shared" else [0, 0, 20, 20])
    index = torch.tensor([5, 0, 0, 3, 1, 2])
    flip = torch.tensor([True, False, True, True, False, False])
    ours = resized_crops(x, index, boxes, flip, size, interpolation)
    theirs = [F.resized_crop(x[i], *box, [size, size], interpolation=MODES[interpolation], antialias=True)
              for i, box in zip(index.tolist(), boxes.tolist())]
    assert torch.equal(ours, torch.stack([t.flip(-1) if f else t for t, f in zip(theirs, flip.tolist())]))
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------- float operations, one by one


def float_batch(batch: int = 6, size: int = 20) -> torch.Tensor:
    return images(batch, size, size, seed=7).to(torch.float32) / 255


def per_image(fn, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(x[i], float(factors[i])) for i in range(len(x))])


@pytest.mark.parametrize("ours,theirs,low,high", [
    (adjust_brightness_, F.adjust_brightness, 0.0, 2.0),
    (adjust_contrast_, F.adjust_contrast, 0.0, 2.0),
    (adjust_saturation_, F.adjust_saturation, 0.0, 2.0),
    (adjust_hue_, F.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_equal_torchvision(ours, theirs, low: float, high: float) -> None:
    x = float_batch()
    x[0, :, :4, :4] = 0.5  # gray pixels: hue's undefined case, saturation's no-op
    factors = torch.linspace(low, high, len(x))
    expected = per_image(theirs, x, factors)
    assert torch.allclose(ours(x.clone(), factors), expected, atol=FLOAT_ATOL, rtol=0)


def test_grayscale_solarize_normalize_equal_torchvision() -> None:
    x = float_batch()
    assert torch.allclose(to_grayscale_(x.clone()), F.rgb_to_grayscale(x, num_output_channels=3), atol=1e-7, rtol=0)
    assert torch.equal(solarize_(x.clone()), F.solarize(x, SOLARIZE_THRESHOLD))
    assert torch.equal(normalize_(x.clone()), F.normalize(x, IMAGENET_MEAN, IMAGENET_STD))


@pytest.mark.parametrize("kernel_size", [3, 9, 23])
def test_blur_equals_torchvision_per_sample_sigma(kernel_size: int) -> None:
    x = float_batch(size=24)
    sigma = torch.linspace(0.1, 2.0, len(x))
    expected = torch.stack([F.gaussian_blur(x[i], [kernel_size] * 2, [float(sigma[i])] * 2) for i in range(len(x))])
    assert torch.allclose(gaussian_blur(x, sigma, kernel_size), expected, atol=FLOAT_ATOL, rtol=0)


# ----------------------------------------------------------------------------- composed views


RECIPE_CASES = {
    "mixdiff_real": RECIPES["simclr"]["real"],
    "mixdiff_synthetic_solarize_often": replace(RECIPES["simclr"]["synthetic"], solarize_p=0.5),
    "no_augmentation": RECIPES["no_augmentation"]["real"],
    "dino_global_2": DINO_GLOBAL_2,
    "dino_local": DINO_LOCAL,
    "grayscale_and_jitter_often": replace(RECIPES["simclr"]["synthetic"], jitter_p=1.0, grayscale_p=0.5),
}


@pytest.mark.parametrize("name", RECIPE_CASES)
@pytest.mark.parametrize("height,width,size", [(40, 40, 40), (64, 48, 24), (33, 37, 17), (24, 24, 36)])
def test_views_equal_torchvision_composition(name: str, height: int, width: int, size: int) -> None:
    batch = 24
    x = images(batch, height, width, seed=size)
    params = sample_view_params(RECIPE_CASES[name], batch, height, width, size, view_generator(size, 0, 0))
    expected = torch.stack([torchvision_view(x[i], params, i) for i in range(batch)])
    assert torch.allclose(augment_views(x, params), expected, atol=FLOAT_ATOL, rtol=0)


@pytest.mark.parametrize("chunk_bytes,block_bytes", [(1, 1 << 30), (1, 1), (1 << 30, 3 * 32 * 32 * 4 * 5)])
def test_views_in_small_chunks_and_blocks_equal_one_of_each(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int,
                                                            block_bytes: int) -> None:
    x = images(16, 32, 32)
    params = sample_view_params(RECIPES["simclr"]["real"], 16, 32, 32, 32, view_generator(0, 0, 0))
    monkeypatch.setattr("onlinemix.views.torch_backend.CPU_CHUNK_BYTES", 1 << 30)
    monkeypatch.setattr("onlinemix.views.torch_backend.BLOCK_BYTES", 1 << 30)
    whole = augment_views(x, params)
    monkeypatch.setattr("onlinemix.views.torch_backend.CPU_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr("onlinemix.views.torch_backend.BLOCK_BYTES", block_bytes)
    assert torch.equal(augment_views(x, params), whole)


def test_tables_and_torchvisions_resize_make_the_same_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU resizes with torchvision's kernel, accelerators with the tables: the same views (one level
    apart at most where torchvision resizes uint8 in float)."""
    x = images(12, 40, 36)
    params = sample_view_params(RECIPES["simclr"]["real"].geometric_only(), 12, 40, 36, 24, view_generator(3, 0, 0))
    native = augment_views(x, params)
    monkeypatch.setattr("onlinemix.views.torch_backend.NATIVE_RESIZE_DEVICES", ())
    tables = augment_views(x, params)
    if uses_native_uint8_path("bilinear"):
        assert torch.equal(tables, native)
    else:
        assert (tables - native).abs().max() <= 1 / 255 / min(IMAGENET_STD) + FLOAT_ATOL


def test_groups_share_one_jitter_order_and_cover_the_batch() -> None:
    params = sample_view_params(RECIPES["simclr"]["synthetic"], 200, 32, 32, 32, view_generator(1, 0, 0))
    perm, ranges = sample_groups(params, chunk=5, block=16)
    assert sorted(perm.tolist()) == list(range(200))
    assert [start for start, _ in ranges] == list(itertools.accumulate([0] + [n for _, n in ranges[:-1]]))
    for start, length in ranges:
        assert 1 <= length <= 5 and start // 16 == (start + length - 1) // 16
        sub = params.select(perm[start:start + length])
        assert len({(bool(j), tuple(o)) if j else False for j, o in zip(sub.jitter, sub.order.tolist())}) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output_is_the_float32_view_rounded(dtype: torch.dtype) -> None:
    x = images(8, 32, 32)
    params = sample_view_params(RECIPES["simclr"]["synthetic"], 8, 32, 32, 32, view_generator(2, 0, 0))
    assert torch.equal(augment_views(x, params, dtype), augment_views(x, params).to(dtype))


def test_views_are_reproducible_by_seed() -> None:
    x = images(8, 32, 32)
    draw = lambda step: augment_views(x, sample_view_params(  # noqa: E731
        RECIPES["simclr"]["real"], 8, 32, 32, 32, view_generator(0, 0, step)))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_batch_of_one_and_wrong_inputs() -> None:
    x = images(1, 17, 23)
    params = sample_view_params(RECIPES["simclr"]["real"], 1, 17, 23, 11, view_generator(0, 0, 0))
    assert torch.allclose(augment_views(x, params)[0], torchvision_view(x[0], params, 0), atol=FLOAT_ATOL, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        augment_views(x.float(), params)
    with pytest.raises(ValueError, match="parameters"):
        augment_views(images(2, 17, 23), params)


# ----------------------------------------------------------------------------- view sets


def test_multicrop_specs_match_augment_multicrop() -> None:
    x = images(3, 48, 48)
    specs = multicrop_specs(32, 16, n_global=2, n_local=5)
    views = MultiCrop(32, 16, n_global=2, n_local=5)(x)
    assert [s.size for s in specs] == [v.shape[-1] for v in views]
    assert [s.recipe.blur_p for s in specs[:2]] == [1.0, 0.1] and specs[1].recipe.solarize_p == 0.2
    assert all(s.recipe.interpolation == v2.InterpolationMode.BICUBIC for s in specs)
    params = sample_specs(specs, 3, 48, 48, view_generator(0, 0, 0))
    ours = [augment_views(x, p) for p in params]
    assert [tuple(v.shape) for v in ours] == [tuple(v.shape) for v in views]


def test_mixdiff_dino_specs_match_augment_crops() -> None:
    crops = MixDiffDinoCrops(global_size=32, local_size=16)
    specs = mixdiff_dino_specs(global_size=32, local_size=16)
    assert tuple(s.source for s in specs) == crops.sources
    assert [s.size for s in specs] == [32, 32] + [16] * 8
    assert specs[0].recipe.blur_p == 1.0 and specs[1].recipe.solarize_p == 0.2
    geometric = mixdiff_dino_specs(32, 16, photometric=False)
    assert all(s.recipe.jitter_p == 0 and s.recipe.blur_p == 0 for s in geometric)


def test_pair_specs_follow_view_recipe() -> None:
    real, synthetic = pair_specs("simclr", 32)
    assert (real.recipe.blur_p, synthetic.recipe.solarize_p) == (1.0, 0.2)
    assert real.recipe.crop_scale == (0.2, 1.0) and (real.source, synthetic.source) == ("real", "synthetic")
    assert pair_specs("no_augmentation", 32)[0].recipe.crop_scale is None


def test_views_written_into_given_rows_equal_their_own_batch() -> None:
    x = images(6, 32, 32)
    params = sample_view_params(RECIPES["simclr"]["synthetic"], 6, 32, 32, 24, view_generator(4, 0, 0))
    rows = torch.tensor([7, 0, 3, 5, 1, 2])
    out = torch.full((8, 3, 24, 24), -9.0)
    assert augment_views(x, params, out=out, rows=rows) is out
    assert torch.equal(out[rows], augment_views(x, params))
    assert bool((out[[4, 6]] == -9.0).all())  # rows nobody asked for are left alone
    with pytest.raises(ValueError, match="out must be"):
        augment_views(x, params, out=torch.empty(8, 3, 32, 32), rows=rows)
    with pytest.raises(ValueError, match="rows must come with out"):
        augment_views(x, params, rows=rows)


def test_compiled_hue_makes_the_eager_views() -> None:
    """TorchInductor's fused hue against the eager backend, on every recipe's jitter at once (batch sizes 1 and
    more, odd sizes: one compiled function serves them all)."""
    warm_up()
    for batch, size in ((1, 17), (9, 24)):
        x = images(batch, 29, 31, seed=batch)
        params = sample_view_params(RECIPES["simclr"]["synthetic"], batch, 29, 31, size, view_generator(5, 0, batch))
        params = replace(params, jitter=torch.ones_like(params.jitter))  # hue on every sample
        assert torch.allclose(augment_views(x, params, compiled=True), augment_views(x, params), atol=FLOAT_ATOL,
                              rtol=0)
