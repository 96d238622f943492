"""Generators of synthetic variations behind one small interface.

:class:`VariationGenerator` is everything producers, ``cache warm``, the cache store and the
statistics command use of a generator: ``generate(images uint8 (B, 3, H, W), seeds) -> uint8
(B, 3, H, W)`` on the generator's device, plus what identifies its output and how it runs.
:func:`make_generator` builds the one ``generator.pipeline`` names through the
:data:`~onlinemix.core.registry.GENERATORS` registry, so this module never imports the others.
The diffusers implementation here preprocesses on the device exactly as the image-variation
model was trained (whole image squashed to the CLIP size, bicubic, no antialiasing, CLIP
mean/std) and never goes through PIL or the CLIP processor, which would antialias and
centre-crop.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImageVariationPipeline,
)
from diffusers.utils import deprecation_utils as diffusers_deprecation
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from onlinemix.core.config import GeneratorConfig
from onlinemix.core.registry import GENERATORS
from onlinemix.generation.speedups import FastUNet, SpeedupError, Speedups
from onlinemix.generation.stub import build_full_size_random_pipeline, build_stub_pipeline

log = logging.getLogger(__name__)

SCHEDULERS = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler,
              "euler": EulerDiscreteScheduler}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PREPROCESSING_VERSION = 1  # bump when the input preprocessing changes the output
FULL_SIZE_RANDOM = "full-size-random"
# name -> directory in the package (python -m onlinemix.tinymodel train / distill)
BUNDLED_MODELS = {"digits-tiny": "assets/digits-tiny", "digits-tiny-student": "assets/digits-tiny-student"}
DISTILLATION_FILE = "distillation.json"  # in a few-step student's directory: how it runs (distilled_settings)
DEFAULT_HUB_MODEL = "lambdalabs/sd-image-variations-diffusers"  # the MixDiff paper's weights
MAX_RETRIES = 3
BLANK_STD = 1e-3  # a generated image whose pixels vary less than this (on [0, 1]) is blank
NOISE_SEED_SALT = 0x5EED_0F_E  # an image's embedding noise is drawn from its seed xor this, not its latents' stream


class GeneratorError(RuntimeError):
    """The generator cannot be built or keeps producing unusable images."""


@runtime_checkable
class VariationGenerator(Protocol):
    """What every consumer of a generator relies on, and all it may rely on."""

    fingerprint: str       # hash of identity(); the cache keys its pairs by it
    attention: str         # the attention backend in use ("sdpa" or "xformers")
    attention_reason: str  # why that backend, for the producer's log and JSON
    dtype: torch.dtype     # the precision it generates in
    retries: int           # non-finite or blank images regenerated so far
    resolution: int        # side of the images it returns (the ring's and the cache's)
    noise: float           # the noise level of a variation when none is given (generator.noise)

    def identity(self) -> dict:
        """Everything that changes the output images (what ``fingerprint`` hashes)."""
        ...

    def generate(self, images: torch.Tensor, seeds: list[int], noises: np.ndarray | None = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) images, one seed and one noise level (None: ``noise`` for all) per image -> one
        uint8 variation per image."""
        ...


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def xformers_unusable() -> str | None:
    """Why xformers cannot serve attention here, or None. Imported only when asked (it is optional).

    A wheel built for another torch still imports, but loads none of its own kernels: what it would run
    is PyTorch's own attention, which SDPA runs without it, so it counts as unusable."""
    if importlib.util.find_spec("xformers") is None:
        return "not installed (pip install '.[xformers]')"
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as e:  # a broken install fails here, often with an OSError
        return f"does not import ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not getattr(xformers, "_has_cpp_library", True):
        failure = getattr(xformers, "_cpp_lib", None) and xformers._cpp_lib._cpp_library_load_exception
        built = getattr(getattr(failure, "build_info", None), "torch_version", "another torch")
        return f"its compiled kernels do not load (xformers {xformers.__version__} was built for torch {built}; " \
               f"this is torch {torch.__version__})"
    return None


def select_attention(pipe: StableDiffusionImageVariationPipeline, requested: str) -> tuple[str, str]:
    """Pick the attention backend; returns (backend, reason). xformers is optional and never imported eagerly."""
    if requested == "sdpa":
        return "sdpa", "requested"
    problem = xformers_unusable()
    if problem is not None:
        if requested == "xformers":
            raise GeneratorError(f"attention=xformers was requested but xformers cannot be used: {problem}")
        return "sdpa", f"xformers unavailable: {problem}"
    try:
        pipe.enable_xformers_memory_efficient_attention()
        return "xformers", "xformers kernels loaded"
    except Exception as e:  # ImportError, or kernels built for another torch / no CUDA
        reason = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if requested == "xformers":
            raise GeneratorError(f"attention=xformers was requested but xformers cannot be used: {reason}") from e
        return "sdpa", f"xformers unavailable ({reason})"


def dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: diffusers renamed ``torch_dtype`` to ``dtype`` (the old name
    warns at every producer start); releases before the rename know only ``torch_dtype``."""
    renamed = hasattr(diffusers_deprecation, "_resolve_dtype")
    return {"dtype" if renamed else "torch_dtype": dtype}


def quiet_loading() -> None:
    """No per-component progress bars while a pipeline loads: they fill every producer's log."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(cfg: GeneratorConfig, device: torch.device, dtype: torch.dtype) -> StableDiffusionImageVariationPipeline:
    """Build or load the pipeline, then apply the configured scheduler and speed options."""
    quiet_loading()
    if cfg.model in ("stub", FULL_SIZE_RANDOM):
        pipe = (build_stub_pipeline(cfg.stub_seed) if cfg.model == "stub"
                else build_full_size_random_pipeline(seed=cfg.stub_seed, device=device))
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        pipe = StableDiffusionImageVariationPipeline.from_pretrained(
            model_location(cfg.model), revision=cfg.revision, safety_checker=None, requires_safety_checker=False,
            **dtype_argument(dtype))
    if cfg.tiny_vae:
        pipe.vae = AutoencoderTiny.from_pretrained(cfg.tiny_vae, **dtype_argument(dtype))
    pipe.scheduler = SCHEDULERS[cfg.scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.compile and cfg.deep_cache_interval > 1:
        # Dynamo does not guard on module hooks: a compiled UNet may run a graph traced without the feature
        # hook (another UNet of the process compiled first), and deep-feature reuse would silently be off.
        raise GeneratorError("generator.compile and generator.deep_cache_interval > 1 do not combine yet: a "
                             "compiled UNet may skip the hook that records the deep features; choose one")
    speed_up(pipe, "unet", Speedups.from_config(cfg))
    if cfg.compile:
        if isinstance(pipe.unet, FastUNet):
            pipe.unet.unet = torch.compile(pipe.unet.unet)
        else:
            pipe.unet = torch.compile(pipe.unet)
    return pipe


def speed_up(pipe, unet_name: str, speedups: Speedups) -> None:
    """Put the pipeline's UNet (attribute ``unet_name``) behind the training-free speed-ups that are on."""
    if not speedups.active:
        return
    try:
        setattr(pipe, unet_name, FastUNet(getattr(pipe, unet_name), speedups))
    except SpeedupError as e:
        raise GeneratorError(str(e)) from e


class DiffusersVariationGenerator:
    """StableDiffusionImageVariationPipeline with device-side preprocessing and per-image seeds.

    Subclasses for other diffusers variation pipelines override the hooks ``_load_pipeline``,
    ``_clip_processor``, ``_prepare``, ``identity`` and ``preprocess``."""

    kind = "sd-image-variation"
    perturbs_embedding = True  # supports per-image noise on the image embedding (generator.noise, strength)

    def __init__(self, cfg: GeneratorConfig, device: torch.device | str, resolution: int) -> None:
        self.cfg = distilled_settings(cfg)
        self.noise = cfg.noise
        self.device = torch.device(device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.resolution = resolution
        self.pipe = self._load_pipeline()
        self.attention, self.attention_reason = select_attention(self.pipe, cfg.attention)
        log.info("%s generator %s on %s, %s, attention=%s (%s)", self.kind, cfg.model, self.device, self.dtype,
                 self.attention, self.attention_reason)
        processor = self._clip_processor()
        self.clip_size = int(self.pipe.image_encoder.config.image_size)
        self.clip_mean = torch.tensor(processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(processor.image_std, device=self.device).view(1, 3, 1, 1)
        # The pipeline accepts sizes divisible by 8 (and by the VAE's spatial factor). A bundled model
        # generates at the size it was trained at; the others at the output resolution unless told.
        multiple = math.lcm(8, self.pipe.vae_scale_factor)
        if cfg.resolution or cfg.model not in BUNDLED_MODELS:
            size = cfg.resolution or resolution
        else:
            size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.gen_size = -(-size // multiple) * multiple
        self._prepare()
        self.fingerprint = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]
        self.retries = 0

    # ------------------------------------------------------------------ hooks
    def _load_pipeline(self) -> StableDiffusionImageVariationPipeline:
        return load_pipeline(self.cfg, self.device, self.dtype)

    def _clip_processor(self):
        """The pipeline's CLIP processor: read for its mean/std only, never run."""
        return self.pipe.feature_extractor

    def _prepare(self) -> None:
        """Last set-up step, once the pipeline and the CLIP constants are known."""

    def identity(self) -> dict:
        """Everything that changes the output images. channels_last, compile and slicing change
        speed and memory, not the images, so they are not part of it; a training-free speed-up that is
        on is (one that is off leaves the identity as it was before the option existed)."""
        random_weights = self.cfg.model in ("stub", FULL_SIZE_RANDOM)
        return {"pipeline": self.kind, "model": self.cfg.model,
                "revision": "" if random_weights or self.cfg.model in BUNDLED_MODELS else self.cfg.revision,
                "stub_seed": self.cfg.stub_seed if random_weights else None, "tiny_vae": self.cfg.tiny_vae,
                "local_weights": local_weights_digest(model_location(self.cfg.model)),
                "dtype": str(self.dtype), "scheduler": self.cfg.scheduler, "steps": self.cfg.steps,
                "guidance": self.cfg.guidance, "size": self.gen_size, "resolution": self.resolution,
                "preprocessing": PREPROCESSING_VERSION, **Speedups.from_config(self.cfg).identity()}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels at the CLIP size -> CLIP pixel values in the generator's dtype."""
        return ((x - self.clip_mean) / self.clip_std).to(self.dtype)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> CLIP pixel values, as the model was trained: squash, bicubic, no antialias."""
        return self.normalize(clip_resize(images.to(self.device), self.clip_size))

    def _run(self, pixels: torch.Tensor, seeds: list[int], noises: np.ndarray) -> torch.Tensor:
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        self._begin_speedups()
        with embedding_noise(self.pipe, noises, seeds):
            out = self.pipe(pixels, height=self.gen_size, width=self.gen_size, num_inference_steps=self.cfg.steps,
                            guidance_scale=self.cfg.guidance, generator=generators, output_type="pt").images
        return out.float()

    def _begin_speedups(self) -> None:
        """Tell the sped-up UNet how many calls this pipeline call makes and whether it guides."""
        unet = next((m for m in self.pipe.components.values() if isinstance(m, FastUNet)), None)
        if unet is not None:
            self.pipe.scheduler.set_timesteps(self.cfg.steps, device=self.device)
            unet.begin(len(self.pipe.scheduler.timesteps), guided=self.cfg.guidance > 1.0)

    @torch.inference_mode()
    def generate(self, images: torch.Tensor, seeds: list[int], noises: np.ndarray | None = None) -> torch.Tensor:
        images = to_rgb_uint8(images)
        if len(seeds) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(seeds)} seeds")
        noises = np.full(len(seeds), self.noise, dtype=np.float32) if noises is None else np.asarray(noises)
        if len(noises) != len(seeds) or (noises < 0).any():
            raise ValueError(f"expected {len(seeds)} noise levels >= 0, got {noises.tolist()}")
        if noises.any() and not self.perturbs_embedding:
            raise GeneratorError(f"the {self.kind} generator does not support noise on the image embedding")
        pixels = self.preprocess(images)
        out = self._run(pixels, seeds, noises)
        # Non-finite (fp16 overflow) or blank outputs are regenerated with a new seed, never passed on.
        for attempt in range(1, MAX_RETRIES + 2):
            bad = unusable_images(out).nonzero().flatten()
            if len(bad) == 0:
                break
            if attempt > MAX_RETRIES:
                raise GeneratorError(f"generator keeps producing non-finite or blank images after {MAX_RETRIES} "
                                     f"retries (dtype {self.dtype}; try generator.dtype=bf16 or fp32)")
            self.retries += len(bad)
            log.warning("generator produced %d non-finite or blank images; regenerating (attempt %d)", len(bad), attempt)
            out[bad] = self._run(pixels[bad], [seeds[i] + attempt * 1_000_003 for i in bad.tolist()],
                                 noises[bad.cpu().numpy()])
        if out.shape[-1] != self.resolution:
            out = F.interpolate(out, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def perturb_embeddings(embeds: torch.Tensor, levels: np.ndarray, seeds: list[int]) -> torch.Tensor:
    """Image embeddings (B, ..., D) moved by noise of relative size ``levels`` (B,): each row e becomes
    |e| * normalize(e / |e| + level * n / sqrt(D)), n ~ N(0, I) drawn from the image's seed on the CPU (the same
    on every device), so its norm, which the UNet saw in training, stays. Rows at level 0 stay exactly as they are."""
    out = embeds.clone()
    dim = embeds.shape[-1]
    for i in np.flatnonzero(levels).tolist():
        e = embeds[i].float()
        n = torch.randn(e.shape, generator=torch.Generator().manual_seed(int(seeds[i]) ^ NOISE_SEED_SALT))
        direction = F.normalize(e / e.norm(dim=-1, keepdim=True) + float(levels[i]) * n.to(e.device) / dim**0.5,
                                dim=-1)
        out[i] = (direction * e.norm(dim=-1, keepdim=True)).to(embeds.dtype)
    return out


@contextmanager
def embedding_noise(pipe: StableDiffusionImageVariationPipeline, levels: np.ndarray,
                    seeds: list[int]) -> Iterator[None]:
    """For one pipeline call, perturb each image's CLIP image embedding by its noise level
    (:func:`perturb_embeddings`); with classifier-free guidance only the conditional half, the unconditional
    embedding being zeros. Nothing changes when every level is 0."""
    if not levels.any():
        yield
        return
    encode = pipe._encode_image

    def noisy_encode(image, device, num_images_per_prompt, do_classifier_free_guidance):
        embeds = encode(image, device, num_images_per_prompt, do_classifier_free_guidance)
        b = len(levels)
        return torch.cat([embeds[:-b], perturb_embeddings(embeds[-b:], levels, seeds)])

    pipe._encode_image = noisy_encode
    try:
        yield
    finally:
        del pipe._encode_image  # the class's method again


def distillation_record(model: str) -> dict | None:
    """A few-step student's ``distillation.json`` (bundled or local directory), None for other models."""
    try:
        path = Path(model_location(model)) / DISTILLATION_FILE
    except FileNotFoundError:
        return None
    return json.loads(path.read_text()) if path.is_file() else None


def distilled_settings(cfg: GeneratorConfig) -> GeneratorConfig:
    """A few-step student (``python -m onlinemix.tinymodel distill``) runs as it was trained: DDIM, its own
    steps, no separate guidance pass (the teacher's guidance is built in). Other models run as configured."""
    record = distillation_record(cfg.model)
    if record is None:
        return cfg
    settings = replace(cfg, scheduler="ddim", steps=int(record["student_steps"]), guidance=1.0)
    if (cfg.scheduler, cfg.steps, cfg.guidance) != (settings.scheduler, settings.steps, settings.guidance):
        log.info("%s is a %d-step student of %s (guidance %g built in): it runs %d DDIM steps without a guidance "
                 "pass, whatever generator.steps, scheduler and guidance say", cfg.model, settings.steps,
                 record["teacher"]["model"], record["teacher"]["guidance"], settings.steps)
    return settings


def clip_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> [0, 1] float (B, 3, size, size) as image-variation models are trained on:
    the whole image squashed, bicubic, no antialiasing."""
    x = images.to(torch.float32) / 255.0
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)


def model_location(model: str) -> str:
    """A bundled model's name -> its directory in the package; a hub id or directory as given.

    A path that does not exist is named as such here: passed on, the hub client would blame its syntax
    as a repo id ("Repo id must use alphanumeric chars ...")."""
    if model in BUNDLED_MODELS:
        return str(resources.files("onlinemix").joinpath(BUNDLED_MODELS[model]))
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_like_path and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"generator.model {model}: no such directory (a local model is a directory with "
                                f"model_index.json; a hub id looks like {DEFAULT_HUB_MODEL})")
    return str(Path(model).expanduser()) if looks_like_path else model


def unusable_images(out: torch.Tensor) -> torch.Tensor:
    """Per image of a float batch in [0, 1]: non-finite anywhere, or blank (one flat colour)."""
    flat = out.flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    blank = torch.nan_to_num(flat).std(dim=1) < BLANK_STD
    return ~finite | blank


def local_weights_digest(model: str) -> str:
    """Identity of a local model directory: its weight files' names and sizes (cheap, no hashing of GBs)."""
    root = Path(model)
    if not root.is_dir():
        return ""
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                   if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """Accept what image batches come as and return uint8 (B, 3, H, W): grey (1 channel) is
    repeated, alpha (4 channels) dropped, 16-bit mapped to 8 bits. Anything else is rejected
    with what was expected; float batches (which may hold NaNs) name the offending image."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of uint8 images (B, 3, H, W), got {type(images).__name__}")
    if images.is_floating_point():
        bad = (~torch.isfinite(images.flatten(1))).any(dim=1).nonzero().flatten().tolist() if images.ndim > 1 else []
        if bad:
            raise ValueError(f"image {bad[0]} of the batch contains NaN or infinite values; expected uint8 (B, 3, H, W)")
        raise TypeError(f"expected uint8 images (B, 3, H, W), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4) or 0 in images.shape:
        raise ValueError(f"expected a non-empty batch of shape (B, 3, H, W) (1 or 4 channels are converted), "
                         f"got {tuple(images.shape)}")
    if images.dtype in (torch.uint16, torch.int16, torch.int32):
        images = (images.to(torch.float32) / 257.0).round().clamp(0, 255).to(torch.uint8)
    elif images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 (or 16-bit) images (B, 3, H, W), got dtype {images.dtype}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images[:, :3]


def make_generator(cfg: GeneratorConfig, device: torch.device | str, resolution: int) -> VariationGenerator:
    """The generator ``generator.pipeline`` names; its module is imported only when it is the one asked for."""
    return GENERATORS.load(cfg.pipeline)(cfg, device, resolution)
