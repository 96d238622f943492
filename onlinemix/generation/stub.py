"""StableDiffusionImageVariationPipelines with random weights, built from the real classes.

- the tiny stub: a few hundred thousand parameters, so the whole system (producers, ring,
  training) runs on a CPU in seconds;
- full size: the real model's architecture from the plain config files in
  ``configs/sd-image-variations``, so generation speed can be measured at true size where
  the weights cannot be downloaded (speed does not depend on weight values).

Same classes, same code path as the real model. Their variations are noise-like images:
they exercise the machinery, not the method.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionImageVariationPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

STUB_CLIP_SIZE = 32
FULL_SIZE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sd-image-variations"


def tiny_components(seed: int, conditioning_dim: int) -> tuple[UNet2DConditionModel, AutoencoderKL,
                                                                  CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """Tiny UNet, VAE (downsamples by 2), CLIP vision tower and CLIP processor, weights fixed by ``seed``.
    The UNet cross-attends to ``conditioning_dim``-wide tokens, the CLIP projection's width."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=conditioning_dim,
            attention_head_dim=4, norm_num_groups=4)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=STUB_CLIP_SIZE, patch_size=8, projection_dim=conditioning_dim))
    for module in (unet, vae, image_encoder):
        module.eval()
    processor = CLIPImageProcessor(size={"shortest_edge": STUB_CLIP_SIZE},
                                   crop_size={"height": STUB_CLIP_SIZE, "width": STUB_CLIP_SIZE})
    return unet, vae, image_encoder, processor


def build_stub_pipeline(seed: int = 0) -> StableDiffusionImageVariationPipeline:
    """The tiny pipeline; a VAE with two blocks downsamples by 2, so outputs are any multiple of 2."""
    unet, vae, image_encoder, processor = tiny_components(seed, conditioning_dim=16)
    return StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=DPMSolverMultistepScheduler(),
        safety_checker=None, feature_extractor=processor, requires_safety_checker=False)


def _read(config_dir: Path, name: str) -> dict:
    config = json.loads((config_dir / f"{name}.json").read_text())
    config.pop("_class_name", None)
    return config


def build_full_size_random_pipeline(config_dir: Path = FULL_SIZE_CONFIGS, seed: int = 0,
                                    device: torch.device | str = "cpu") -> StableDiffusionImageVariationPipeline:
    """The real model's architecture with random weights (about 1.2B parameters), built on ``device``."""
    if not (config_dir / "unet.json").is_file():
        raise FileNotFoundError(f"full-size configs not found in {config_dir} (they ship in the repository's configs/)")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(_read(config_dir, "unet"))
        vae = AutoencoderKL.from_config(_read(config_dir, "vae"))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_read(config_dir, "image_encoder")))
    pipe = StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet,
        scheduler=PNDMScheduler.from_config(_read(config_dir, "scheduler")), safety_checker=None,
        feature_extractor=CLIPImageProcessor(**_read(config_dir, "feature_extractor")), requires_safety_checker=False)
    for module in (unet, vae, image_encoder):
        module.eval()
    return pipe
