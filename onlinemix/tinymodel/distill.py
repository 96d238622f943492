"""A few-step student of an SD image-variation pipeline, with classifier-free guidance built in.

The teacher is any StableDiffusionImageVariationPipeline the generator loads (digits-tiny by default: 10
DPM-Solver++ steps, each two UNet evaluations for guidance k=3). The student is a copy of its UNet that
predicts the teacher's final latent directly (``prediction_type="sample"``) from any point of a K-step
DDIM trajectory, conditioned on the image embedding alone: one UNet evaluation per step, K of them.

Method: trajectory distillation (knowledge distillation of the sampler, Luhman & Luhman 2021, made
multi-step). The teacher samples each (training image, noise) pair once, with guidance; the student
learns to map the noise to that sample in K DDIM steps, each step's input made from the student's own
previous prediction (as at inference), each step's target the teacher's sample. Why not the others:
progressive distillation halves the steps per round (10 -> 5 -> 3 -> 2 -> 1: four rounds, each sampling
the teacher again); consistency distillation needs an EMA target network and many more iterations to
converge. Regressing the teacher's endpoint costs one teacher sampling per training pair and converges
in minutes at this scale. Its known cost is blur where the teacher's mapping is hard to learn (samples
near mode boundaries): measured on the digits by ``tinymodel quality`` (docs/generators.md).

The student ships as a pipeline directory like any other, with a ``distillation.json`` that the generator
reads to run it as trained (:func:`onlinemix.generation.generator.distilled_settings`): DDIM, its K steps,
no guidance pass.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from onlinemix.core.config import DataConfig, GeneratorConfig
from onlinemix.data import load_real_images
from onlinemix.generation.generator import DISTILLATION_FILE, DiffusersVariationGenerator
from onlinemix.tinymodel.train import check_out, save_model, setting


@dataclass
class DistillSettings:
    seed: int = setting(0, "student batches, the teacher's noise")
    student_steps: int = setting(2, "DDIM steps of the student (1-8), one UNet evaluation each")
    samples_per_image: int = setting(4, "teacher samples (noise draws) per training image")
    images: int = setting(0, "training images the teacher samples, the first ones of the split (0 = all)")
    steps: int = setting(3000, "optimizer steps of the student")
    batch_size: int = setting(64, "training pairs per step")
    lr: float = setting(3e-4, "AdamW learning rate (cosine decay with warm-up), starting from the teacher's weights")


@dataclass
class TeacherSamples:
    """What the student learns from: per training pair, its image embedding, noise and the teacher's sample."""
    embeddings: torch.Tensor  # (N, 1, D)
    noise: torch.Tensor       # (N, C, h, w): the initial latents
    targets: torch.Tensor     # (N, C, h, w): the teacher's final latents from that noise


def student_scheduler(teacher: DDIMScheduler | object, steps: int) -> DDIMScheduler:
    """DDIM on the teacher's noise schedule, predicting the sample, with ``steps`` trailing timesteps: the
    first at the last training timestep, where the student starts from pure noise."""
    scheduler = DDIMScheduler.from_config(teacher.config, prediction_type="sample", timestep_spacing="trailing",
                                          clip_sample=False, steps_offset=0)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_teacher(teacher: DiffusersVariationGenerator, images: torch.Tensor, per_image: int, seed: int,
                   batch: int = 64) -> TeacherSamples:
    """The teacher's guided samples (latents, not decoded) of ``per_image`` noise draws of each image."""
    pipe = teacher.pipe
    images = images.repeat_interleave(per_image, dim=0)
    shape = (pipe.unet.config.in_channels, teacher.gen_size // pipe.vae_scale_factor,
             teacher.gen_size // pipe.vae_scale_factor)
    noise = torch.randn((len(images), *shape), generator=torch.Generator().manual_seed(seed))
    embeddings, targets = [], []
    for start in tqdm(range(0, len(images), batch), desc="teacher samples", unit="batch"):
        pixels = teacher.preprocess(images[start:start + batch])
        embeddings.append(pipe.image_encoder(pixels).image_embeds.unsqueeze(1).float().cpu())
        out = pipe(pixels, height=teacher.gen_size, width=teacher.gen_size, num_inference_steps=teacher.cfg.steps,
                   guidance_scale=teacher.cfg.guidance, latents=noise[start:start + batch].to(teacher.device,
                                                                                             teacher.dtype),
                   output_type="latent").images
        targets.append(out.float().cpu())
    return TeacherSamples(torch.cat(embeddings), noise, torch.cat(targets))


def rollout_loss(student: torch.nn.Module, scheduler: DDIMScheduler, samples: TeacherSamples,
                 idx: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the teacher's sample at every student step, each step's input the DDIM update
    of the previous one with the student's own (detached) prediction: the trajectory inference follows."""
    alphas = scheduler.alphas_cumprod
    x, target, embeddings = samples.noise[idx], samples.targets[idx], samples.embeddings[idx]
    timesteps = scheduler.timesteps.tolist()
    loss = torch.zeros(())
    for k, t in enumerate(timesteps):
        prediction = student(x, t, encoder_hidden_states=embeddings).sample
        loss = loss + F.mse_loss(prediction, target)
        if k + 1 < len(timesteps):
            a, a_next = alphas[t], alphas[timesteps[k + 1]]
            x0 = prediction.detach()
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return loss / len(timesteps)


def distill(teacher_cfg: GeneratorConfig, data: DataConfig, out: Path, settings: DistillSettings) -> dict:
    """Sample the teacher on ``data``'s training images, train the student from ``settings.seed``, and save its
    pipeline to ``out`` (fp16, replacing what was there once complete) with ``distillation.json`` and
    ``loss.png``."""
    if not 1 <= settings.student_steps <= 8:
        raise ValueError(f"--student-steps {settings.student_steps}: a few-step student takes 1 to 8 steps")
    check_out(out)
    started = time.monotonic()
    torch.manual_seed(settings.seed)
    teacher = DiffusersVariationGenerator(replace(teacher_cfg, dtype="fp32"), "cpu", data.resolution)
    real = load_real_images(data)
    ids = real.train_ids[:settings.images or None]
    samples = sample_teacher(teacher, real.images[ids], settings.samples_per_image, settings.seed)
    sampled_s = time.monotonic() - started

    student = copy.deepcopy(teacher.pipe.unet).float().train()
    scheduler = student_scheduler(teacher.pipe.scheduler, settings.student_steps)
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=1e-4)
    lr_schedule = get_cosine_schedule_with_warmup(opt, settings.steps // 20, settings.steps)
    rng = torch.Generator().manual_seed(settings.seed)
    losses = []
    for _ in (bar := tqdm(range(settings.steps), desc=f"{settings.student_steps}-step student", unit="step")):
        loss = rollout_loss(student, scheduler, samples,
                            torch.randint(len(samples.noise), (settings.batch_size,), generator=rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    student.eval()

    pipe = teacher.pipe
    pipe.unet, pipe.scheduler = student, scheduler
    record = {"settings": asdict(settings), "student_steps": settings.student_steps,
              "timesteps": scheduler.timesteps.tolist(),
              "teacher": {"model": teacher_cfg.model, "steps": teacher_cfg.steps, "guidance": teacher_cfg.guidance,
                          "scheduler": teacher_cfg.scheduler, "fingerprint": teacher.fingerprint},
              "training_pairs": len(samples.noise), "teacher_seconds": round(sampled_s, 1),
              "seconds": round(time.monotonic() - started, 1), "loss": losses}
    save_model(pipe, out, DISTILLATION_FILE, record, lambda path: plot_loss(losses, path, settings.student_steps))
    return record


def plot_loss(losses: list[float], path: Path, student_steps: int) -> None:
    import matplotlib  # lazily: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    values = torch.tensor(losses)
    ax.plot(values, lw=0.5, alpha=0.4)
    window = max(1, len(values) // 50)
    ax.plot(torch.arange(window - 1, len(values)), values.unfold(0, window, 1).mean(1), lw=1.5)
    ax.set(xlabel="step", ylabel="MSE to the teacher's sample", yscale="log",
           title=f"{student_steps}-step student of the guided teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
