"""The Versatile Diffusion variation generator, run on the CPU with its tiny stub."""

from __future__ import annotations

import builtins
import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_same_variation

from onlinemix.core.config import GeneratorConfig
from onlinemix.generation.generator import DiffusersVariationGenerator, GeneratorError, make_generator
from onlinemix.generation.versatile import (
    UNCOND_PIXEL,
    VersatileVariationGenerator,
    build_stub_versatile_pipeline,
    encode_pixel_values,
    versatile_pipeline_class,
)

RES = 32
CFG = GeneratorConfig(model="stub", steps=4)


def random_images(n: int, h: int = RES, w: int = RES, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(i.permute(1, 2, 0).numpy()) for i in images]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gen() -> VersatileVariationGenerator:
    return VersatileVariationGenerator(CFG, "cpu", RES)


# ----------------------------------------------------------------------------- the stub


def test_stub_is_the_real_pipeline_and_tiny() -> None:
    pipe = build_stub_versatile_pipeline(0)
    assert type(pipe) is versatile_pipeline_class()
    n = sum(p.numel() for m in (pipe.image_unet, pipe.vae, pipe.image_encoder) for p in m.parameters())
    assert 50_000 < n < 1_000_000
    # Weights are fixed by the seed.
    again, other = build_stub_versatile_pipeline(0), build_stub_versatile_pipeline(1)
    weight = pipe.image_unet.conv_in.weight
    assert torch.equal(weight, again.image_unet.conv_in.weight)
    assert not torch.equal(weight, other.image_unet.conv_in.weight)


# ----------------------------------------------------------------------------- output


def test_output_dtype_and_shape(gen: VersatileVariationGenerator) -> None:
    out = gen.generate(random_images(4), [1, 2, 3, 4])
    assert out.dtype == torch.uint8
    assert out.shape == (4, 3, RES, RES)
    assert out.float().std() > 0


def test_same_seeds_same_output(gen: VersatileVariationGenerator) -> None:
    images = random_images(4)
    assert torch.equal(gen.generate(images, [10, 11, 12, 13]), gen.generate(images, [10, 11, 12, 13]))


def test_different_seed_different_output(gen: VersatileVariationGenerator) -> None:
    images = random_images(4)
    a = gen.generate(images, [10, 11, 12, 13])
    b = gen.generate(images, [99, 11, 12, 13])
    assert not torch.equal(a[0], b[0])
    assert torch.equal(a[1:], b[1:])


def test_output_independent_of_batch_mates(gen: VersatileVariationGenerator) -> None:
    images = random_images(4)
    seeds = [5, 6, 7, 8]
    together = gen.generate(images, seeds)
    assert_same_variation(gen.generate(images[:2], seeds[:2]), together[:2])
    assert_same_variation(gen.generate(images[[1, 0]], [seeds[1], seeds[0]]), together[[1, 0]])


def test_output_depends_on_the_image(gen: VersatileVariationGenerator) -> None:
    a = gen.generate(random_images(2, seed=1), [1, 2])
    b = gen.generate(random_images(2, seed=2), [1, 2])
    assert not torch.equal(a, b)


def test_other_resolution_and_no_guidance() -> None:
    g = VersatileVariationGenerator(dataclasses.replace(CFG, guidance=1.0), "cpu", 23)
    assert g.gen_size % 8 == 0 and g.gen_size >= 23
    assert g.generate(random_images(2), [1, 2]).shape == (2, 3, 23, 23)


# ----------------------------------------------------------------------------- conditioning


def test_conditioning_matches_the_pipelines_own_encoder(gen: VersatileVariationGenerator) -> None:
    """Fed device-preprocessed pixels, the replaced ``_encode_prompt`` gives what the pipeline's own
    gives for the same images through its CLIP processor (images at the CLIP size, so no resampling
    is involved): every token, projected, and the same unconditional branch."""
    images = random_images(3)
    own = type(gen.pipe)._encode_prompt
    with torch.inference_mode():
        expected = own(gen.pipe, to_pil(images), torch.device("cpu"), 1, True, None)
        got = gen.pipe._encode_prompt(gen.preprocess(images), torch.device("cpu"), 1, True, None)
    tokens = (gen.clip_size // gen.pipe.image_encoder.config.patch_size) ** 2 + 1
    assert got.shape == (6, tokens, gen.pipe.image_unet.config.cross_attention_dim)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_unconditional_image_is_the_pipelines(gen: VersatileVariationGenerator) -> None:
    fe = gen.pipe.image_feature_extractor
    theirs = fe(images=[np.zeros((512, 512, 3)) + 0.5], return_tensors="pt").pixel_values
    ours = gen.normalize(torch.full((1, 3, gen.clip_size, gen.clip_size), UNCOND_PIXEL))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(gen.uncond_embeds, encode_pixel_values(gen.pipe, theirs), rtol=0, atol=1e-5)


def test_generation_never_calls_the_clip_processor(gen: VersatileVariationGenerator,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CLIP processor was called")

    monkeypatch.setattr(type(gen.pipe.image_feature_extractor), "__call__", refuse)
    assert gen.generate(random_images(2), [1, 2]).shape == (2, 3, RES, RES)


@pytest.mark.parametrize("h, w", [(16, 16), (64, 64), (80, 48), (40, 20)])
def test_preprocess_matches_pil_resize(gen: VersatileVariationGenerator, h: int, w: int) -> None:
    """Up- and downscaling, wide and tall: within one 8-bit level of Pillow's bicubic resize."""
    images = random_images(3, h=h, w=w, seed=h + w)
    size = gen.clip_size
    pil = torch.stack([torch.from_numpy(np.array(im.resize((size, size), PIL.Image.BICUBIC))).permute(2, 0, 1)
                       for im in to_pil(images)])
    expected = gen.normalize(pil.float() / 255.0)
    got = gen.preprocess(images)
    assert got.shape == (3, 3, size, size)
    one_level = (1 / 255 / gen.clip_std).max().item()
    assert (got - expected).abs().max().item() <= one_level + 1e-5


# ----------------------------------------------------------------------------- bad inputs and config


def test_float_images_rejected(gen: VersatileVariationGenerator) -> None:
    with pytest.raises(TypeError, match="uint8"):
        gen.generate(random_images(2).float(), [1, 2])


def test_seed_count_mismatch(gen: VersatileVariationGenerator) -> None:
    with pytest.raises(ValueError, match="seeds"):
        gen.generate(random_images(3), [1, 2])


def test_missing_pipeline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def without_vd(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        if fromlist and "VersatileDiffusionImageVariationPipeline" in fromlist:
            raise ImportError("cannot import name 'VersatileDiffusionImageVariationPipeline'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", without_vd)
    with pytest.raises(GeneratorError, match="VersatileDiffusionImageVariationPipeline"):
        VersatileVariationGenerator(CFG, "cpu", RES)


def test_unsupported_speed_option_is_refused() -> None:
    with pytest.raises(GeneratorError, match="vae_slicing"):
        VersatileVariationGenerator(dataclasses.replace(CFG, vae_slicing=True), "cpu", RES)


# ----------------------------------------------------------------------------- fingerprint


def test_has_every_attribute_of_the_sd_generator(gen: VersatileVariationGenerator) -> None:
    """Its hooks must not drop anything the SD generator sets (``generate`` and the producer read them)."""
    missing = set(vars(DiffusersVariationGenerator(CFG, "cpu", RES))) - set(vars(gen))
    assert not missing, f"VersatileVariationGenerator lacks {sorted(missing)}"


def test_fingerprint_differs_from_the_sd_generator(gen: VersatileVariationGenerator) -> None:
    assert gen.fingerprint != DiffusersVariationGenerator(CFG, "cpu", RES).fingerprint


def test_fingerprint_stable_and_follows_settings(gen: VersatileVariationGenerator) -> None:
    assert VersatileVariationGenerator(CFG, "cpu", RES).fingerprint == gen.fingerprint
    for change in ({"guidance": 5.0}, {"steps": 2}, {"stub_seed": 1}):
        other = VersatileVariationGenerator(dataclasses.replace(CFG, **change), "cpu", RES)
        assert other.fingerprint != gen.fingerprint, change


def test_generator_pipeline_setting_selects_versatile_diffusion() -> None:
    assert isinstance(make_generator(GeneratorConfig(model="stub", pipeline="versatile"), "cpu", RES), VersatileVariationGenerator)
    assert type(make_generator(GeneratorConfig(model="stub"), "cpu", RES)) is DiffusersVariationGenerator
