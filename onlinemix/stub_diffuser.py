"""A tiny StableDiffusionImageVariationPipeline built from the real diffusers classes.

Same classes, same code path, random weights fixed by a seed and a few hundred thousand
parameters in all, so the whole system (producers, ring, training) runs on a CPU in
seconds. Its variations are noise-like images, not meaningful variations: it exercises
the machinery, not the method.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

STUB_CLIP_SIZE = 32


def build_stub_pipeline(seed: int = 0) -> StableDiffusionImageVariationPipeline:
    """The tiny pipeline; a VAE with two blocks downsamples by 2, so outputs are any multiple of 2."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
            attention_head_dim=4, norm_num_groups=4)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=STUB_CLIP_SIZE, patch_size=8, projection_dim=16))
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": STUB_CLIP_SIZE},
                                           crop_size={"height": STUB_CLIP_SIZE, "width": STUB_CLIP_SIZE})
    pipe = StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=DPMSolverMultistepScheduler(),
        safety_checker=None, feature_extractor=feature_extractor, requires_safety_checker=False)
    for module in (unet, vae, image_encoder):
        module.eval()
    return pipe
