"""Generator speed options and random-weight pipelines: same images, less time or memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny

from onlinemix.config import GeneratorConfig
from onlinemix.generate import DiffusersVariationGenerator
from onlinemix.stub_diffuser import build_full_size_random_pipeline

RES = 32


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, RES, RES), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def baseline(images: torch.Tensor) -> torch.Tensor:
    return DiffusersVariationGenerator(GeneratorConfig(), "cpu", RES).generate(images, [1, 2, 3])


def generate_with(images: torch.Tensor, **options) -> tuple[DiffusersVariationGenerator, torch.Tensor]:
    gen = DiffusersVariationGenerator(dataclasses.replace(GeneratorConfig(), **options), "cpu", RES)
    return gen, gen.generate(images, [1, 2, 3])


@pytest.mark.parametrize("options", [{"channels_last": True}, {"vae_slicing": True}, {"compile": True}])
def test_speed_options_keep_the_images_and_the_fingerprint(images, baseline, options) -> None:
    gen, out = generate_with(images, **options)
    assert (out.int() - baseline.int()).abs().max() <= 1  # the same images, up to float rounding
    assert gen.fingerprint == DiffusersVariationGenerator(GeneratorConfig(), "cpu", RES).fingerprint


def test_tiny_vae_from_a_local_directory(images, baseline, tmp_path: Path) -> None:
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "taesd")
    gen, out = generate_with(images, tiny_vae=str(tmp_path / "taesd"))
    assert isinstance(gen.pipe.vae, AutoencoderTiny)
    assert out.shape == baseline.shape and out.dtype == torch.uint8
    assert not torch.equal(out, baseline)  # another decoder: other images, hence another fingerprint
    assert gen.fingerprint != DiffusersVariationGenerator(GeneratorConfig(), "cpu", RES).fingerprint


def test_full_size_architecture_matches_the_released_model() -> None:
    """Built on the meta device: parameter counts of SD 1.x UNet, SD VAE and CLIP ViT-L/14 vision + projection."""
    pipe = build_full_size_random_pipeline(device="meta")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "vae", "image_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "image_encoder": 303_966_208}
    assert pipe.unet.config.cross_attention_dim == pipe.image_encoder.config.projection_dim == 768
    assert pipe.image_encoder.config.image_size == 224 and pipe.vae_scale_factor == 8
