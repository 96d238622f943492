"""Training digits-tiny the way image-variation models are trained, on the digits' training split.

Two stages, one seed: the VAE learns to reconstruct the 8x8 digits (reconstruction + a small KL
term), then is frozen; the UNet learns to denoise VAE latents of an image conditioned on the image
embedding of that same image. The image encoder is trained jointly with the UNet: a randomly
initialised encoder that stays fixed carries little class information (the real model's CLIP
was trained for that on 400M image-text pairs), while training it through the denoising loss
makes the embedding keep what the UNet needs to redraw the digit. One embedding in ten is
replaced by zeros, the pipeline's unconditional input, so classifier-free guidance works. The
held-out images (``data.holdout_fraction``, as the trainer splits them) are never seen, so the
quality measurement runs on images the model did not learn.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from ..config import DataConfig
from ..data import split_ids
from ..data.decode import load_digits
from ..files import write_json
from ..generate import clip_resize
from .model import CLIP_SIZE, NATIVE_SIZE, assemble_pipeline, build_components, clip_processor, training_scheduler


def setting(default: float, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainSettings:
    seed: int = setting(0, "initial weights, batches and noise")
    vae_steps: int = setting(400, "steps of the VAE stage")
    steps: int = setting(2500, "steps of the UNet + image encoder stage")
    batch_size: int = setting(64, "images per step, both stages")
    lr: float = setting(1e-3, "AdamW learning rate, both stages (cosine decay with warm-up in the second)")
    kl_weight: float = setting(1e-4, "weight of the VAE's KL term")
    conditioning_dropout: float = setting(0.1, "fraction of embeddings replaced by the unconditional (zero) one")

    def __post_init__(self) -> None:
        if min(self.vae_steps, self.steps, self.batch_size) < 1 or self.seed < 0:
            raise ValueError(f"steps, vae_steps and batch_size must be at least 1 and seed at least 0, got {self}")
        if not (self.lr > 0 and self.kl_weight >= 0 and 0 <= self.conditioning_dropout < 1):
            raise ValueError(f"expected lr > 0, kl_weight >= 0 and conditioning_dropout in [0, 1), got {self}")


@dataclass
class TrainingImages:
    """The digits' training split: diffusion targets at the native size in [-1, 1], and the encoder's
    input as the generator prepares it from the trainer's images (CLIP size, CLIP mean/std)."""
    targets: torch.Tensor
    clip_pixels: torch.Tensor


def training_images() -> TrainingImages:
    data = DataConfig()
    native, _, _ = load_digits(NATIVE_SIZE)
    stored, _, _ = load_digits(data.resolution)
    train_ids, _ = split_ids(len(native), data.holdout_fraction)
    processor = clip_processor()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
    return TrainingImages(native[train_ids].float() / 127.5 - 1,
                          (clip_resize(stored[train_ids], CLIP_SIZE) - mean) / std)


def train_vae(vae: torch.nn.Module, images: torch.Tensor, settings: TrainSettings, rng: torch.Generator) -> list[float]:
    """Reconstruction with a light KL pull towards N(0, 1); returns the loss per step."""
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    losses = []
    vae.train()
    for _ in (bar := tqdm(range(settings.vae_steps), desc="vae", unit="step")):
        x = images[torch.randint(len(images), (settings.batch_size,), generator=rng)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=rng)).sample
        loss = F.mse_loss(reconstruction, x) + settings.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def scaled_latents(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The latents' means, scaled to unit variance; the factor is stored in the VAE's config, where the
    pipeline reads it to undo the scaling before decoding."""
    latents = vae.encode(images).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return latents * vae.config.scaling_factor


def train_denoiser(unet: torch.nn.Module, image_encoder: torch.nn.Module, latents: torch.Tensor,
                   clip_pixels: torch.Tensor, settings: TrainSettings, rng: torch.Generator) -> list[float]:
    """Noise prediction on latents conditioned on their own image's embedding (zeroed at the
    conditioning-dropout rate); UNet and encoder optimised together. Returns the loss per step."""
    scheduler = training_scheduler()
    params = [*unet.parameters(), *image_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    lr_schedule = get_cosine_schedule_with_warmup(opt, settings.steps // 20, settings.steps)
    losses = []
    unet.train()
    image_encoder.train()
    for _ in (bar := tqdm(range(settings.steps), desc="unet + image encoder", unit="step")):
        idx = torch.randint(len(latents), (settings.batch_size,), generator=rng)
        z0 = latents[idx]
        embedding = image_encoder(clip_pixels[idx]).image_embeds.unsqueeze(1)
        keep = torch.rand(len(idx), 1, 1, generator=rng) >= settings.conditioning_dropout
        noise = torch.randn(z0.shape, generator=rng)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(idx),), generator=rng)
        prediction = unet(scheduler.add_noise(z0, noise, t), t, embedding * keep).sample
        loss = F.mse_loss(prediction, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    image_encoder.eval()
    return losses


def train(out: Path, settings: TrainSettings) -> dict:
    """Train from ``settings.seed`` and save the pipeline to ``out`` (fp16 safetensors, replacing what
    was there once complete), with ``training.json`` (settings and losses) and ``loss.png``."""
    torch.use_deterministic_algorithms(True)
    rng = torch.Generator().manual_seed(settings.seed)
    data = training_images()
    unet, vae, image_encoder = build_components(settings.seed)
    vae_losses = train_vae(vae, data.targets, settings, rng)
    latents = scaled_latents(vae, data.targets)
    denoiser_losses = train_denoiser(unet, image_encoder, latents, data.clip_pixels, settings, rng)
    pipe = assemble_pipeline(unet, vae, image_encoder).to(dtype=torch.float16)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    log = {"settings": asdict(settings), "training_images": len(data.targets),
           "vae_loss": vae_losses, "denoiser_loss": denoiser_losses}
    write_json(staging / "training.json", log)
    plot_losses(log, staging / "loss.png")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return log


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib  # lazily: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in zip(axes, ("vae_loss", "denoiser_loss"),
                              ("VAE: reconstruction + KL", "UNet + image encoder: noise prediction")):
        losses = torch.tensor(log[key])
        ax.plot(losses, lw=0.5, alpha=0.4)
        window = max(1, len(losses) // 50)
        smooth = F.avg_pool1d(losses[None, None], window, 1).flatten() if len(losses) >= window else losses
        ax.plot(torch.arange(len(smooth)) + window // 2, smooth)
        ax.set(xlabel="step", ylabel="loss (MSE)", yscale="log", title=title)
    fig.suptitle(f"digits-tiny on {log['training_images']} training digits, seed {log['settings']['seed']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
