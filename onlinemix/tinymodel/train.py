"""Training digits-tiny the way image-variation models are trained, on the digits' training split.

Two stages, one seed: the VAE learns to reconstruct the 8x8 digits (reconstruction + a small KL
term), then is frozen; the UNet learns to denoise VAE latents of a digit conditioned on the image
embedding of that digit. The image encoder is trained jointly with the UNet: a randomly
initialised encoder that stays fixed carries little class information (the real model's CLIP
was trained for that on 400M image-text pairs), while training it through the denoising loss
makes the embedding keep what the UNet needs to draw the digit.

Two things keep that embedding from carrying the source's pixels, with which the model would
redraw the source in place (a copy) and redraw a held-out digit whose embedding lands near a
training digit of another class as that class: the denoising target is the digit drawn anew by a
random affine map (shift, rotation, scale, shear; ``draw_targets``) while the encoder sees the
digit itself, so the embedding must name the digit rather than where its ink is; and noise
relative to the embedding's size is added to it in training (``with_noise``), so only what survives
noise, the digit's class and style, is worth keeping. One embedding in ten is replaced by zeros, the
pipeline's unconditional input, so classifier-free guidance works. The held-out images
(``data.holdout_fraction``, as the trainer splits them) are never seen, so the quality measurement
runs on images the model did not learn.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImageVariationPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from torchvision.transforms import v2
from tqdm.auto import tqdm

from onlinemix.core.config import DataConfig
from onlinemix.core.files import unwritable_reason, write_json
from onlinemix.data import split_ids
from onlinemix.data.decode import load_digits
from onlinemix.generation.generator import clip_resize
from onlinemix.tinymodel.model import (
    CLIP_SIZE,
    NATIVE_SIZE,
    assemble_pipeline,
    build_components,
    clip_processor,
    training_scheduler,
)


def setting(default: float, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainSettings:
    seed: int = setting(0, "initial weights, batches and noise")
    vae_steps: int = setting(400, "steps of the VAE stage")
    steps: int = setting(7500, "steps of the UNet + image encoder stage")
    batch_size: int = setting(64, "images per step, both stages")
    lr: float = setting(1e-3, "AdamW learning rate, both stages (cosine decay with warm-up in the second)")
    kl_weight: float = setting(1e-4, "weight of the VAE's KL term")
    conditioning_dropout: float = setting(0.1, "fraction of embeddings replaced by the unconditional (zero) one")
    shift: float = setting(0.17, "targets' random shift, at most this fraction of the side each way")
    rotation: float = setting(17.0, "targets' random rotation, at most this many degrees each way")
    scale: float = setting(0.17, "targets' random scale, within 1 -/+ this")
    shear: float = setting(12.0, "targets' random horizontal shear, at most this many degrees each way")
    embedding_noise: float = setting(0.4, "Gaussian noise added to the embedding in training, relative to its RMS")

    def __post_init__(self) -> None:
        if min(self.vae_steps, self.steps, self.batch_size) < 1 or self.seed < 0:
            raise ValueError(f"steps, vae_steps and batch_size must be at least 1 and seed at least 0, got {self}")
        if not (self.lr > 0 and self.kl_weight >= 0 and 0 <= self.conditioning_dropout < 1):
            raise ValueError(f"expected lr > 0, kl_weight >= 0 and conditioning_dropout in [0, 1), got {self}")
        if not (0 <= self.shift < 0.5 and 0 <= self.rotation <= 180 and 0 <= self.scale < 1 and 0 <= self.shear < 90
                and self.embedding_noise >= 0):
            raise ValueError(f"expected shift in [0, 0.5), rotation in [0, 180], scale in [0, 1), shear in [0, 90) "
                             f"and embedding_noise >= 0, got {self}")


DRAW_FACTOR = 4  # targets are drawn at 4x the native size, so that a shift or rotation moves ink by sub-pixels


@dataclass
class TrainingImages:
    """The digits' training split: grey digits in [-1, 1] at ``DRAW_FACTOR`` times the native size
    (each pixel a block, so that drawing without a transform gives back the native digit exactly),
    from which each step's diffusion targets are drawn (:func:`draw_targets`), and the encoder's
    input as the generator prepares it from the trainer's images (CLIP size, CLIP mean/std)."""
    blocks: torch.Tensor
    clip_pixels: torch.Tensor


def training_images() -> TrainingImages:
    data = DataConfig()
    native, _, _ = load_digits(NATIVE_SIZE)
    stored, _, _ = load_digits(data.resolution)
    train_ids, _ = split_ids(len(native), data.holdout_fraction)
    processor = clip_processor()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
    return TrainingImages(digit_blocks(native[train_ids]), (clip_resize(stored[train_ids], CLIP_SIZE) - mean) / std)


def digit_blocks(native: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, 8, 8) digits -> grey (B, 1, 32, 32) in [-1, 1], each pixel a ``DRAW_FACTOR`` block."""
    return F.interpolate(native[:, :1].float(), scale_factor=DRAW_FACTOR, mode="nearest") / 127.5 - 1


def uniform(n: int, half_width: float, rng: torch.Generator, centre: float = 0.0) -> list[float]:
    return (centre + half_width * (2 * torch.rand(n, generator=rng) - 1)).tolist()


def draw_targets(blocks: torch.Tensor, settings: TrainSettings, rng: torch.Generator) -> torch.Tensor:
    """Diffusion targets (B, 3, 8, 8) from :class:`TrainingImages` blocks (B, 1, 32, 32): each digit
    drawn anew by a random affine map (the settings' shift, rotation, scale and shear), then
    area-downsampled to the native size, as a hand writes the same digit at another place, slant and
    size. Trained on such targets, the model redraws the digit its embedding names rather than the
    source's pixels."""
    n, side = len(blocks), blocks.shape[-1]
    angles, shears = uniform(n, settings.rotation, rng), uniform(n, settings.shear, rng)
    scales = uniform(n, settings.scale, rng, centre=1.0)
    shifts = (torch.tensor(uniform(2 * n, settings.shift, rng)) * side).view(n, 2).tolist()
    drawn = torch.stack([
        v2.functional.affine(digit, angle=angle, translate=shift, scale=scale, shear=[shear, 0.0],
                             interpolation=v2.InterpolationMode.BILINEAR, fill=-1.0)
        for digit, angle, shift, scale, shear in zip(blocks, angles, shifts, scales, shears)])
    return F.interpolate(drawn, size=(NATIVE_SIZE, NATIVE_SIZE), mode="area").expand(-1, 3, -1, -1)


def train_vae(vae: torch.nn.Module, blocks: torch.Tensor, settings: TrainSettings, rng: torch.Generator) -> list[float]:
    """Reconstruction of drawn targets with a light KL pull towards N(0, 1); returns the loss per step."""
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    losses = []
    vae.train()
    for _ in (bar := tqdm(range(settings.vae_steps), desc="vae", unit="step")):
        x = draw_targets(blocks[torch.randint(len(blocks), (settings.batch_size,), generator=rng)], settings, rng)
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
def set_latent_scaling(vae: torch.nn.Module, targets: torch.Tensor) -> None:
    """Store the factor that scales the latents' means of ``targets`` to unit variance in the VAE's
    config, where the pipeline reads it to undo the scaling before decoding."""
    vae.register_to_config(scaling_factor=float(1 / vae.encode(targets).latent_dist.mean.std()))


def with_noise(embedding: torch.Tensor, relative_std: float, rng: torch.Generator) -> torch.Tensor:
    """The embedding plus Gaussian noise of ``relative_std`` times its RMS: a bottleneck that the
    encoder cannot escape by growing the embedding, so it keeps what survives noise (the digit's class)
    rather than every pixel."""
    if relative_std == 0:
        return embedding
    rms = embedding.detach().pow(2).mean(dim=-1, keepdim=True).sqrt()
    return embedding + relative_std * rms * torch.randn(embedding.shape, generator=rng)


def train_denoiser(unet: torch.nn.Module, image_encoder: torch.nn.Module, vae: torch.nn.Module, data: TrainingImages,
                   settings: TrainSettings, rng: torch.Generator) -> list[float]:
    """Noise prediction on VAE latents of drawn targets, conditioned on the embedding of the source
    digit (zeroed at the conditioning-dropout rate); UNet and encoder optimised together. Returns the
    loss per step."""
    scheduler = training_scheduler()
    params = [*unet.parameters(), *image_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    lr_schedule = get_cosine_schedule_with_warmup(opt, settings.steps // 20, settings.steps)
    losses = []
    unet.train()
    image_encoder.train()
    for _ in (bar := tqdm(range(settings.steps), desc="unet + image encoder", unit="step")):
        idx = torch.randint(len(data.blocks), (settings.batch_size,), generator=rng)
        with torch.no_grad():
            z0 = vae.encode(draw_targets(data.blocks[idx], settings, rng)).latent_dist.mean * vae.config.scaling_factor
        embedding = with_noise(image_encoder(data.clip_pixels[idx]).image_embeds, settings.embedding_noise, rng)
        keep = torch.rand(len(idx), 1, 1, generator=rng) >= settings.conditioning_dropout
        noise = torch.randn(z0.shape, generator=rng)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(idx),), generator=rng)
        prediction = unet(scheduler.add_noise(z0, noise, t), t, embedding.unsqueeze(1) * keep).sample
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
    check_out(out)
    torch.use_deterministic_algorithms(True)
    rng = torch.Generator().manual_seed(settings.seed)
    data = training_images()
    unet, vae, image_encoder = build_components(settings.seed)
    vae_losses = train_vae(vae, data.blocks, settings, rng)
    set_latent_scaling(vae, draw_targets(data.blocks, settings, rng))
    denoiser_losses = train_denoiser(unet, image_encoder, vae, data, settings, rng)
    log = {"settings": asdict(settings), "training_images": len(data.blocks),
           "vae_loss": vae_losses, "denoiser_loss": denoiser_losses}
    save_model(assemble_pipeline(unet, vae, image_encoder), out, "training.json", log,
               lambda path: plot_losses(log, path))
    return log


def check_out(out: Path) -> None:
    """Refuse an output directory that cannot take a model, before the training rather than after it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the model")
    problem = unwritable_reason(out.parent)
    if problem:
        raise ValueError(f"--out {out}: its folder {out.parent} cannot hold the model ({problem})")


def save_model(pipe: StableDiffusionImageVariationPipeline, out: Path, record_name: str, record: dict,
               plot: Callable[[Path], None]) -> None:
    """Save ``pipe`` in fp16 safetensors with its JSON record and loss plot to ``out``, replacing what was there
    only once all of it is written."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.to(dtype=torch.float16).save_pretrained(staging, safe_serialization=True)
    write_json(staging / record_name, record)
    plot(staging / "loss.png")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


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
