"""Generator speed options and random-weight pipelines: same images, less time or memory."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny

from onlinemix.core.config import GeneratorConfig, load_config
from onlinemix.core.schedule import EpochSchedule
from onlinemix.data import load_real_images
from onlinemix.exchange.ring import PairRing
from onlinemix.generation.generator import DiffusersVariationGenerator
from onlinemix.generation.producer import ProducerPool
from onlinemix.generation.stub import build_full_size_random_pipeline, build_stub_pipeline

RES = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, RES, RES), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def baseline(images: torch.Tensor) -> torch.Tensor:
    return DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", RES).generate(images, [1, 2, 3])


def generate_with(images: torch.Tensor, **options) -> tuple[DiffusersVariationGenerator, torch.Tensor]:
    gen = DiffusersVariationGenerator(dataclasses.replace(GeneratorConfig(model="stub"), **options), "cpu", RES)
    return gen, gen.generate(images, [1, 2, 3])


@pytest.mark.parametrize("options", [{"channels_last": True}, {"vae_slicing": True}, {"compile": True}])
def test_speed_options_keep_the_images_and_the_fingerprint(images, baseline, options) -> None:
    gen, out = generate_with(images, **options)
    assert (out.int() - baseline.int()).abs().max() <= 1  # the same images, up to float rounding
    assert gen.fingerprint == DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", RES).fingerprint


def test_tiny_vae_from_a_local_directory(images, baseline, tmp_path: Path) -> None:
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "taesd")
    gen, out = generate_with(images, tiny_vae=str(tmp_path / "taesd"))
    assert isinstance(gen.pipe.vae, AutoencoderTiny)
    assert out.shape == baseline.shape and out.dtype == torch.uint8
    assert not torch.equal(out, baseline)  # another decoder: other images, hence another fingerprint
    assert gen.fingerprint != DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", RES).fingerprint


def test_full_size_architecture_matches_the_released_model() -> None:
    """Built on the meta device: parameter counts of SD 1.x UNet, SD VAE and CLIP ViT-L/14 vision + projection."""
    pipe = build_full_size_random_pipeline(device="meta")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "vae", "image_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "image_encoder": 303_966_208}
    assert pipe.unet.config.cross_attention_dim == pipe.image_encoder.config.projection_dim == 768
    assert pipe.image_encoder.config.image_size == 224 and pipe.vae_scale_factor == 8


def test_loading_from_a_local_directory_goes_through_from_pretrained(images, baseline, tmp_path: Path) -> None:
    """The real loading path (from_pretrained on a local directory), fed with the stub's weights."""
    build_stub_pipeline(0).save_pretrained(tmp_path / "model")
    gen, out = generate_with(images, model=str(tmp_path / "model"))
    assert torch.equal(out, baseline)  # same weights, same images
    stub_fingerprint = DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", RES).fingerprint
    assert gen.fingerprint != stub_fingerprint
    (tmp_path / "model" / "unet" / "extra.safetensors").write_bytes(b"0" * 10)  # other weights, other identity
    assert generate_with(images, model=str(tmp_path / "model"))[0].fingerprint != gen.fingerprint


def test_producer_metadata_records_attention_and_fingerprint(tmp_path: Path, no_leaked_segments) -> None:
    cfg = load_config(None, {"train.batch_size": "32", "ring.slots": "64", "output_dir": str(tmp_path)})
    ring = PairRing.create(cfg.ring.slots, cfg.data.resolution)
    schedule = EpochSchedule(load_real_images(cfg.data).train_ids.numpy(), 32, cfg.train.seed)
    pool = ProducerPool(cfg, ring, ["cpu"], schedule, tmp_path)
    try:
        pool.start()
        while ring.header.ready_producers < 1:
            pool.check()
            time.sleep(0.05)
        meta = json.loads((tmp_path / "producer-0.json").read_text())
    finally:
        pool.stop()
        ring.close()
    assert meta["attention"] == "sdpa" and "xformers" in meta["attention_reason"]
    assert meta["fingerprint"] == DiffusersVariationGenerator(cfg.generator, "cpu", RES).fingerprint
