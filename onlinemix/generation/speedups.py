"""Training-free speed-ups for any ``UNet2DConditionModel`` image-variation pipeline.

They work around the pipeline's own sampling loop, which stays as diffusers wrote it (latents, scheduler,
decoding): :class:`FastUNet` takes the pipeline's UNet's place and decides, call by call, how much of the
UNet to run.

- **Deep-feature reuse** (DeepCache, Ma et al. 2024): between adjacent steps the features of the UNet's
  deep blocks change little. A full pass every ``deep_cache_interval`` calls records what enters the last
  up block; the calls between run only the outermost blocks (``conv_in``, the first down block, the last
  up block) on that recorded feature and their own fresh skips.
- **Guidance on part of the steps**: classifier-free guidance doubles the batch ([unconditional;
  conditional]). After the first ``guidance_fraction`` of the calls the unconditional half is skipped and
  the conditional prediction is returned for both halves, so the pipeline's guidance formula
  (u + k (c - u)) yields c: late steps refine detail, where guidance matters least.
- **Token merging** (ToMe for SD, Bolya & Hoffman 2023, through the ``tomesd`` package): self-attention
  runs on ``tome_ratio`` fewer tokens in the transformer blocks of the highest resolution that has any
  (SD's 64x64 latent blocks, where attention costs most). Its random partition is off, so an image's
  variation depends only on its seed.

Each option changes the images, so each is part of the generator's identity (``DiffusersVariationGenerator
.identity``): cached variations made without it are never served as if made with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from onlinemix.core.config import GeneratorConfig


class SpeedupError(ValueError):
    """A speed-up cannot apply to this UNet."""


@dataclass(frozen=True)
class Speedups:
    """The training-free options of ``generator.*`` (defaults: off)."""
    deep_cache_interval: int = 1
    guidance_fraction: float = 1.0
    tome_ratio: float = 0.0

    @classmethod
    def from_config(cls, cfg: GeneratorConfig) -> Speedups:
        return cls(cfg.deep_cache_interval, cfg.guidance_fraction, cfg.tome_ratio)

    @property
    def active(self) -> bool:
        return self != Speedups()

    def identity(self) -> dict:
        """The options that are on, for the generator's fingerprint (off ones leave it as it was)."""
        return {k: v for k, v in vars(self).items() if v != getattr(Speedups(), k)}


class FastUNet(nn.Module):
    """The pipeline's UNet behind the speed-ups; :meth:`begin` before each pipeline call. Attributes the
    pipeline reads (``config``, ``dtype``...) are the wrapped UNet's."""

    def __init__(self, unet: nn.Module, speedups: Speedups) -> None:
        super().__init__()
        if speedups.deep_cache_interval > 1:
            check_deep_cache(unet)
        if speedups.tome_ratio > 0:
            import tomesd

            tomesd.apply_patch(unet, ratio=speedups.tome_ratio, max_downsample=first_attention_downsample(unet),
                               use_rand=False)
        self.unet = unet
        self.speedups = speedups
        self._call = 0
        self._guided = False
        self._guided_calls = 0
        self._deep: torch.Tensor | None = None
        self._recording = False
        # Only deep-feature reuse records anything: the other options add no hook to the UNet's passes.
        self._hook = (unet.up_blocks[-1].register_forward_pre_hook(self._record, with_kwargs=True)
                      if speedups.deep_cache_interval > 1 else None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def unwrap(self) -> nn.Module:
        """The plain UNet back, its token-merging patch and the feature hook removed (to measure another
        option on the same weights)."""
        if self._hook is not None:
            self._hook.remove()
        if self.speedups.tome_ratio > 0:
            import tomesd

            tomesd.remove_patch(self.unet)
        return self.unet

    def begin(self, calls: int, guided: bool) -> None:
        """A pipeline call with ``calls`` UNet calls starts, ``guided``: the pipeline doubles each batch for
        classifier-free guidance. Schedules restart; the feature cache empties."""
        self._call = 0
        self._guided = guided
        self._guided_calls = round(self.speedups.guidance_fraction * calls)
        self._deep = None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **kwargs) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        call = self._call
        self._call += 1
        if self._guided and call >= self._guided_calls:
            half = sample.shape[0] // 2
            out = self._denoise(call, sample[half:], timestep, encoder_hidden_states[half:], kwargs)
            out = torch.cat([out, out])
        else:
            out = self._denoise(call, sample, timestep, encoder_hidden_states, kwargs)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _denoise(self, call: int, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                 kwargs: dict) -> torch.Tensor:
        interval = self.speedups.deep_cache_interval
        if interval > 1 and call % interval and self._deep is not None:
            return shallow_forward(self.unet, sample, timestep, encoder_hidden_states, self._deep_rows(len(sample)))
        self._recording = interval > 1
        try:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
        finally:
            self._recording = False

    def _deep_rows(self, rows: int) -> torch.Tensor:
        """The recorded feature for ``rows`` images: the conditional half once guidance has stopped."""
        return self._deep if len(self._deep) == rows else self._deep[-rows:]

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recording:
            self._deep = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def first_attention_downsample(unet: nn.Module) -> int:
    """The downsampling factor of the UNet's first down block with attention (1 for SD, whose first block
    attends at the latent's full size), which token merging is applied up to."""
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            return 2 ** i
    return 1


def check_deep_cache(unet: nn.Module) -> None:
    """Deep-feature reuse rebuilds the outer blocks' inputs as :meth:`UNet2DConditionModel.forward` does for
    a plain text- or image-conditioned UNet; refuse the extras it does not rebuild."""
    config = unet.config
    extras = [name for name in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type")
              if getattr(config, name, None) is not None]
    if extras:
        raise SpeedupError(f"generator.deep_cache_interval needs a UNet without {', '.join(extras)}")
    if len(unet.down_blocks) < 2:
        raise SpeedupError("generator.deep_cache_interval needs a UNet with at least two down blocks")


def shallow_forward(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor | int,
                    encoder_hidden_states: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """The UNet's output from its outermost blocks only, with ``deep`` (recorded at the last full pass) in
    place of what the inner blocks would hand the last up block. Equal to the full pass when ``deep`` is
    that pass's own feature."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                               added_cond_kwargs=None)
    hidden = unet.conv_in(sample)
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    if getattr(first, "has_cross_attention", False):
        _, skips = first(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
    else:
        _, skips = first(hidden_states=hidden, temb=emb)
    skips = ((hidden,) + tuple(skips))[:len(last.resnets)]  # the skips the last up block takes, first ones
    if getattr(last, "has_cross_attention", False):
        out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips,
                   encoder_hidden_states=encoder_hidden_states, upsample_size=None)
    else:
        out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None)
    if unet.conv_norm_out:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out)
