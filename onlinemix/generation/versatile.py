"""The paper's alternative generator: Versatile Diffusion's image-variation flow.

``VersatileVariationGenerator`` is a :class:`onlinemix.generation.generator.VariationGenerator`
(``generate(uint8 (B, 3, H, W), seeds) -> uint8 (B, 3, H, W)``, ``fingerprint``, ``identity()``,
``attention``, ``dtype``, ``retries``) built on the hooks of
:class:`~onlinemix.generation.generator.DiffusersVariationGenerator`; ``generator.pipeline: versatile`` selects
it (:data:`onlinemix.core.registry.GENERATORS`). It runs diffusers'
``VersatileDiffusionImageVariationPipeline``, which is deprecated (it lives in
``diffusers.pipelines.deprecated.versatile_diffusion``) and may be missing from a diffusers
install: it is imported only when this generator or its stub is built, and its absence raises
:class:`~onlinemix.generation.generator.GeneratorError` saying so.

How the image conditioning is fed
---------------------------------
VD conditions its UNet on *every* token of CLIP ViT's last hidden state (post-layernormed,
projected by ``visual_projection``, divided by the norm of the projected class token), not on
the pooled embedding that SD image variations uses. The pipeline's ``_encode_prompt`` always
runs its ``image_feature_extractor`` (the CLIP processor) on whatever it is given: a tensor is
split into a list and rescaled, resized and centre-cropped on the host. There is no
``image_embeds`` / ``prompt_embeds`` argument and no processor-free path. Rather than copying
``__call__``'s sampling loop (timesteps, per-image latents, guidance, decoding), the generator
replaces only that one step: :func:`feed_pixel_values` sets, on its own pipeline instance, an
``_encode_prompt`` that takes device-preprocessed CLIP pixel values and applies VD's
normalisation (:func:`encode_pixel_values`, the pipeline's own ``normalize_embeddings``). The
rest of ``__call__`` runs unchanged. The private signature is checked when the generator is
built, so a diffusers that changes it fails there, with a clear error.

Preprocessing (on the device, never PIL or the CLIP processor): VD's own code converts images
to PIL and runs the CLIP processor of its time, i.e. PIL's antialiased bicubic resize of 8-bit
images, then CLIP mean/std. :meth:`VersatileVariationGenerator.preprocess` reproduces PIL's
resize with ``F.interpolate(..., antialias=True)`` in PIL's two separable passes, each clipped
and rounded to 8-bit levels (within one level of Pillow; the tests check it), and squashes the
whole image to the CLIP size like VD's demo (which resizes to a square before encoding); the
diffusers processor would centre-crop instead. The ring's images are square, where both agree.

Classifier-free guidance: diffusers' pipeline encodes a constant image ``np.zeros((512, 512, 3))
+ 0.5`` through the processor, which since transformers 4.26 rescales that float image by 1/255
a second time, so the unconditional image diffusers actually uses is a near-black constant
(0.5/255). :data:`UNCOND_PIXEL` reproduces it exactly (the tests compare against the pipeline's
own ``_encode_prompt``); its embedding is computed once, on the device, when the generator is
built. (VD's own code uses a black image; the 0.5 literal suggests mid-grey was intended.)
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler

from onlinemix.core.config import GeneratorConfig
from onlinemix.generation.generator import (
    BUNDLED_MODELS,
    FULL_SIZE_RANDOM,
    SCHEDULERS,
    DiffusersVariationGenerator,
    GeneratorError,
    dtype_argument,
    quiet_loading,
    speed_up,
)
from onlinemix.generation.speedups import Speedups
from onlinemix.generation.stub import tiny_components

log = logging.getLogger(__name__)

PIPELINE_KIND = "versatile-diffusion-image-variation"
DEFAULT_MODEL = "shi-labs/versatile-diffusion"
VD_PREPROCESSING_VERSION = 2  # bump when preprocess() or the unconditional image changes the output
# (2: PIL's two clipped passes; 1 was a single float pass)
UNCOND_PIXEL = 0.5 / 255  # the constant unconditional image diffusers' pipeline feeds CLIP, in [0, 1]
STUB_CLIP_SIZE = 32
_ENCODE_PROMPT_PARAMS = ["self", "prompt", "device", "num_images_per_prompt", "do_classifier_free_guidance",
                         "negative_prompt"]
# Speed options of load_pipeline that address SD's ``pipe.unet`` / ``pipe.vae`` and are not wired up here yet.
_UNSUPPORTED_OPTIONS = {"tiny_vae": "", "channels_last": False, "vae_slicing": False, "compile": False}


def versatile_pipeline_class() -> type:
    """diffusers' VersatileDiffusionImageVariationPipeline, imported on demand."""
    try:
        from diffusers import VersatileDiffusionImageVariationPipeline as cls
    except ImportError:
        try:
            from diffusers.pipelines.deprecated.versatile_diffusion import (
                VersatileDiffusionImageVariationPipeline as cls,
            )
        except ImportError as e:
            import diffusers
            raise GeneratorError(
                f"the Versatile Diffusion generator needs diffusers' VersatileDiffusionImageVariationPipeline, which "
                f"diffusers {diffusers.__version__} does not provide (it is deprecated); install a diffusers that "
                f"still ships diffusers.pipelines.deprecated.versatile_diffusion (0.42 does)") from e
    return cls


def build_stub_versatile_pipeline(seed: int = 0):
    """A tiny VersatileDiffusionImageVariationPipeline with random weights fixed by ``seed``.

    The real classes with a few hundred thousand parameters. The UNet's cross-attention width is
    CLIP's ``projection_dim`` (VD projects every token), deliberately different from CLIP's
    ``hidden_size``; 32 x 32 CLIP input with 8 x 8 patches gives 17 conditioning tokens. The VAE
    downsamples by 2.
    """
    cls = versatile_pipeline_class()
    image_unet, vae, image_encoder, processor = tiny_components(seed, conditioning_dim=24)
    return cls(image_feature_extractor=processor, image_encoder=image_encoder, image_unet=image_unet,
               vae=vae, scheduler=DPMSolverMultistepScheduler())


def encode_pixel_values(pipe, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP pixel values (B, 3, S, S) -> VD conditioning (B, tokens, projection_dim).

    The pipeline's ``_encode_prompt.normalize_embeddings`` (a closure there, so not importable):
    all tokens post-layernormed and projected, scaled by the projected class token's norm.
    """
    encoder = pipe.image_encoder
    hidden = encoder(pixel_values.to(encoder.dtype)).last_hidden_state
    embeds = encoder.visual_projection(encoder.vision_model.post_layernorm(hidden))
    return embeds / torch.norm(embeds[:, 0:1], dim=-1, keepdim=True)


def feed_pixel_values(pipe, uncond_embeds: torch.Tensor) -> None:
    """Make ``pipe(image=pixel_values, ...)`` condition on device-preprocessed CLIP pixel values.

    Replaces, on this pipeline instance only, the one step of ``__call__`` that would run the
    CLIP processor; ``uncond_embeds`` (1, tokens, dim) is the guidance branch's conditioning.
    """
    params = list(inspect.signature(type(pipe)._encode_prompt).parameters)
    if params != _ENCODE_PROMPT_PARAMS:
        raise GeneratorError(f"{type(pipe).__name__}._encode_prompt{tuple(params)} is not the signature this "
                             f"generator replaces {tuple(_ENCODE_PROMPT_PARAMS)}; onlinemix.generation.versatile needs updating")

    def _encode_prompt(prompt: torch.Tensor, device: torch.device, num_images_per_prompt: int,
                       do_classifier_free_guidance: bool, negative_prompt: None) -> torch.Tensor:
        if not (isinstance(prompt, torch.Tensor) and prompt.ndim == 4) or negative_prompt is not None:
            raise TypeError("this pipeline takes CLIP pixel values (B, 3, S, S) and no negative_prompt")
        embeds = encode_pixel_values(pipe, prompt.to(device)).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            embeds = torch.cat([uncond_embeds.to(embeds.dtype).expand(len(embeds), -1, -1), embeds])
        return embeds

    pipe._encode_prompt = _encode_prompt


def load_versatile_pipeline(cfg: GeneratorConfig, device: torch.device, dtype: torch.dtype):
    """Build the stub or load a VD checkpoint, then apply the configured scheduler."""
    unsupported = [k for k, off in _UNSUPPORTED_OPTIONS.items() if getattr(cfg, k, off) != off]
    if unsupported:
        raise GeneratorError(f"generator option(s) {', '.join(unsupported)} are not supported by the Versatile "
                             f"Diffusion generator yet")
    if cfg.model in (FULL_SIZE_RANDOM, *BUNDLED_MODELS):
        raise GeneratorError(f"model={cfg.model} is an SD image-variation model; the Versatile Diffusion "
                             f"generator takes 'stub' or a VD checkpoint (e.g. {DEFAULT_MODEL})")
    if cfg.model == "stub":
        pipe = build_stub_versatile_pipeline(cfg.stub_seed)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        quiet_loading()
        pipe = versatile_pipeline_class().from_pretrained(cfg.model, **dtype_argument(dtype))
    pipe.scheduler = SCHEDULERS[cfg.scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    speed_up(pipe, "image_unet", Speedups.from_config(cfg))
    return pipe


class VersatileVariationGenerator(DiffusersVariationGenerator):
    """VersatileDiffusionImageVariationPipeline with device-side preprocessing and per-image seeds.

    Everything but loading, the CLIP conditioning and the preprocessing is inherited: input
    checks, regeneration of non-finite or blank images, one ``torch.Generator`` per image, the
    resize to ``resolution`` and uint8 output.
    """

    kind = PIPELINE_KIND
    perturbs_embedding = False  # VD conditions on every CLIP token; noise on them is not defined here

    def _load_pipeline(self):
        return load_versatile_pipeline(self.cfg, self.device, self.dtype)

    def _clip_processor(self):
        return self.pipe.image_feature_extractor

    def _prepare(self) -> None:
        with torch.inference_mode():
            uncond = torch.full((1, 3, self.clip_size, self.clip_size), UNCOND_PIXEL, device=self.device)
            self.uncond_embeds = encode_pixel_values(self.pipe, self.normalize(uncond))
        feed_pixel_values(self.pipe, self.uncond_embeds)

    def identity(self) -> dict:
        identity = super().identity()
        del identity["revision"]  # VD checkpoints load without one
        return {**identity, "vd_preprocessing": VD_PREPROCESSING_VERSION, "uncond_pixel": UNCOND_PIXEL}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> CLIP pixel values as VD's CLIP saw them: the whole image resized to
        the CLIP size the way PIL resizes 8-bit images, then CLIP mean/std.

        PIL's antialiased bicubic runs two separable passes, each clipped and rounded to 8-bit
        levels, horizontal first unless the image is taller than wide. Done so here, the result is
        within one level of Pillow; a single float pass would differ by up to ~16 levels where PIL
        clips the first pass's overshoot, which is frequent when upscaling small images."""
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        size = self.clip_size
        for pass_size in ((h, size), (size, size)) if w >= h else ((size, w), (size, size)):
            x = F.interpolate(x, size=pass_size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0, 255).round()
        return self.normalize(x / 255.0)
