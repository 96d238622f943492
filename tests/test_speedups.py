"""Training-free generation speed-ups: what each skips, that the rest is the pipeline's own computation, and
that every option that changes the images changes the fingerprint."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

from onlinemix.core.config import GeneratorConfig
from onlinemix.generation.generator import DiffusersVariationGenerator, GeneratorError, speed_up
from onlinemix.generation.speedups import FastUNet, Speedups, first_attention_downsample, shallow_forward
from onlinemix.generation.stub import build_stub_pipeline

RES = 32
SEEDS = [1, 2, 3]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, RES, RES), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def generator(**options) -> DiffusersVariationGenerator:
    return DiffusersVariationGenerator(dataclasses.replace(GeneratorConfig(model="stub"), **options), "cpu", RES)


def attention_first_unet() -> UNet2DConditionModel:
    """SD's layout in small: cross-attention in the first down block and the last up block."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=4, norm_num_groups=4).eval()


@pytest.mark.parametrize("make_unet", [lambda: build_stub_pipeline(0).unet, attention_first_unet],
                         ids=["plain-outer-blocks", "attention-outer-blocks"])
@torch.no_grad()
def test_the_shallow_pass_on_its_own_deep_feature_is_the_full_pass(make_unet) -> None:
    unet = make_unet()
    fast = FastUNet(unet, Speedups(deep_cache_interval=2))
    fast.begin(calls=2, guided=False)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 1, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    full = fast(sample, 500, encoder_hidden_states=context).sample  # call 0: full, records the deep feature
    assert torch.allclose(shallow_forward(unet, sample, 500, context, fast._deep), full, atol=1e-5)
    reused = fast(sample, 500, encoder_hidden_states=context).sample  # call 1: shallow, on the recorded feature
    assert torch.allclose(reused, full, atol=1e-5)


@torch.no_grad()
def test_deep_cache_runs_the_inner_blocks_once_every_interval() -> None:
    pipe = build_stub_pipeline(0)
    inner_calls = []
    pipe.unet.mid_block.register_forward_hook(lambda *_: inner_calls.append(1))
    fast = FastUNet(pipe.unet, Speedups(deep_cache_interval=3))
    fast.begin(calls=7, guided=False)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 1, 16)
    for t in range(7):
        fast(sample, 900 - 100 * t, encoder_hidden_states=context)
    assert len(inner_calls) == 3  # calls 0, 3 and 6


def test_with_every_option_off_the_wrapped_unet_is_the_pipelines(images) -> None:
    plain = generator()
    wrapped = generator()
    wrapped.pipe.unet = FastUNet(wrapped.pipe.unet, Speedups())
    assert torch.equal(wrapped.generate(images, SEEDS), plain.generate(images, SEEDS))


def test_guidance_on_no_step_is_the_unguided_pipeline(images) -> None:
    """After the guided share of the calls only the conditional half runs, and the pipeline's guidance
    formula returns it: with a share of 0 that is exactly sampling without guidance."""
    none = generator(guidance_fraction=0.0).generate(images, SEEDS)
    unguided = generator(guidance=1.0).generate(images, SEEDS)
    assert torch.equal(none, unguided)
    half = generator(guidance_fraction=0.5).generate(images, SEEDS)
    assert not torch.equal(half, none) and not torch.equal(half, generator().generate(images, SEEDS))


def test_each_option_changes_the_images_and_the_fingerprint_and_off_changes_neither(images) -> None:
    base = generator()
    reference = base.generate(images, SEEDS)
    assert "deep_cache_interval" not in base.identity()  # off: the identity of caches made before the options
    for options in ({"deep_cache_interval": 2}, {"guidance_fraction": 0.5}, {"tome_ratio": 0.5}):
        gen = generator(**options)
        assert gen.fingerprint != base.fingerprint, options
        assert not torch.equal(gen.generate(images, SEEDS), reference), options
    assert generator(deep_cache_interval=1, guidance_fraction=1.0, tome_ratio=0.0).fingerprint == base.fingerprint


def test_a_sped_up_variation_depends_only_on_its_seed(images) -> None:
    """Token merging's random partition is off and the feature cache restarts with every call: an image's
    variation is the same alone or after others."""
    gen = generator(deep_cache_interval=2, tome_ratio=0.5, guidance_fraction=0.6)
    together = gen.generate(images, SEEDS)
    gen.generate(images[:1], [9])
    alone = gen.generate(images[2:], SEEDS[2:])
    assert (together[2:].int() - alone.int()).abs().max() <= 1


def test_token_merging_applies_where_attention_first_appears() -> None:
    assert first_attention_downsample(build_stub_pipeline(0).unet) == 2  # its first down block has none
    assert first_attention_downsample(attention_first_unet()) == 1       # as in SD


def test_deep_cache_refuses_a_unet_it_cannot_rebuild() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4, class_embed_type="timestep")
    pipe = build_stub_pipeline(0)
    pipe.unet = unet
    with pytest.raises(GeneratorError, match="class_embed_type"):
        speed_up(pipe, "unet", Speedups(deep_cache_interval=2))


def test_versatile_diffusion_takes_the_speedups(images) -> None:
    from onlinemix.generation.versatile import VersatileVariationGenerator

    cfg = GeneratorConfig(model="stub", pipeline="versatile")
    plain = VersatileVariationGenerator(cfg, "cpu", RES)
    fast = VersatileVariationGenerator(dataclasses.replace(cfg, deep_cache_interval=2, guidance_fraction=0.5), "cpu",
                                       RES)
    assert isinstance(fast.pipe.image_unet, FastUNet)
    assert fast.fingerprint != plain.fingerprint
    out = fast.generate(images, SEEDS)
    assert out.shape == images.shape and not torch.equal(out, plain.generate(images, SEEDS))


def test_compiling_keeps_the_sped_up_images_and_refuses_deep_feature_reuse(images) -> None:
    """torch.compile wraps the UNet behind guidance on part of the steps; compiled kernels round differently
    (a few pixels move by a few levels after ten steps), the option itself moves the images ten times as much.
    Deep-feature reuse records its feature with a module hook, which Dynamo does not guard on: refused."""
    plain = generator().generate(images, SEEDS).float()
    sped = generator(guidance_fraction=0.5).generate(images, SEEDS).float()
    compiled = generator(guidance_fraction=0.5, compile=True)
    assert isinstance(compiled.pipe.unet, FastUNet)
    rounding = (compiled.generate(images, SEEDS).float() - sped).abs().mean()
    assert rounding < (sped - plain).abs().mean() / 10
    with pytest.raises(GeneratorError, match="do not combine"):
        generator(deep_cache_interval=2, compile=True)
