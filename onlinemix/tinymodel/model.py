"""The architecture of digits-tiny: the image-variation pipeline's own classes, sized for 8x8 digits.

Pixel space: a one-block ``AutoencoderKL`` keeps the spatial size (VAE scale factor 1), so the UNet
denoises 3 x 8 x 8 latents, the digits' native resolution. The CLIP image encoder sees the image at
16 px in 4-px patches and hands the UNet one 32-wide embedding, as the real model hands it one
768-wide CLIP embedding.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImageVariationPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

NATIVE_SIZE = 8         # the digits' own resolution: the images the UNet denoises
CLIP_SIZE = 16          # the image encoder's input side
EMBEDDING_DIM = 32      # the image embedding the UNet cross-attends to
TRAIN_TIMESTEPS = 1000


def build_components(seed: int) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPVisionModelWithProjection]:
    """Untrained UNet, VAE and image encoder, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=NATIVE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=EMBEDDING_DIM,
            attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), latent_channels=3, norm_num_groups=8, layers_per_block=1,
            sample_size=NATIVE_SIZE)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=CLIP_SIZE, patch_size=4, projection_dim=EMBEDDING_DIM))
    return unet, vae, image_encoder


def training_scheduler() -> DDPMScheduler:
    """The noise schedule of training; the pipeline samples with DPM-Solver++ on the same betas.

    The cosine schedule suits small images, whose signal a linear one destroys too early. Its last
    timesteps keep almost no signal (alpha_bar near 1e-8 at t=999), where turning a noise
    prediction into an image divides by that signal: a sampler that starts there saturates. So
    samplers start at the first of evenly spaced steps ('leading': t=900 for 10 steps), and never
    clip their image estimate to [-1, 1] (latents are not bounded so). Neither setting changes
    training, which only adds noise."""
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", timestep_spacing="leading", clip_sample=False)


def clip_processor() -> CLIPImageProcessor:
    """Saved for its mean/std (the generator preprocesses on the device and never runs it)."""
    return CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})


def assemble_pipeline(unet: UNet2DConditionModel, vae: AutoencoderKL,
                      image_encoder: CLIPVisionModelWithProjection) -> StableDiffusionImageVariationPipeline:
    for module in (unet, vae, image_encoder):
        module.eval()
    return StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(training_scheduler().config), safety_checker=None,
        feature_extractor=clip_processor(), requires_safety_checker=False)
