"""FLOPs of one generated image (UNet forward per denoising call, VAE or tiny-VAE decode, CLIP image encode),
counted with ``torch.utils.flop_counter.FlopCounterMode``, and the FLOP bound they give each row."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderTiny, StableDiffusionImageVariationPipeline, UNet2DConditionModel
from torch.utils import flop_counter
from transformers import CLIPVisionModelWithProjection

from .measure import error_text


def _flop_mapping() -> dict:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU one, which it would count as 0 FLOPs."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flop} if op is not None else {}


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)  # the formula of the CUDA kernels


def _count(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn``."""
    with torch.inference_mode(), FlopCounter() as fc:
        fn()
    return int(fc.get_total_flops())


class FlopCounter(flop_counter.FlopCounterMode):
    """FlopCounterMode, silent, counting the CPU's SDPA kernel as the CUDA ones are counted."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=_flop_mapping())


def count_flops(plain: StableDiffusionImageVariationPipeline, model: str, gen_size: int, guidance: float,
                tiny_vae_dir: str | None) -> dict:
    """FLOPs of one image's components: UNet forward (batch 2 with guidance > 1), VAE decode, CLIP encode.

    On the meta device (shapes only, no compute) from the plain pipeline's configs; if that fails, on the
    plain pipeline itself (fp32, its device, batch 1). The stub is counted on its real modules: cheap.
    """
    def components(unet, vae, encoder, tiny, device) -> dict:
        cfg_batch = 2 if guidance > 1.0 else 1
        lat = gen_size // plain.vae_scale_factor
        latent = torch.zeros(1, unet.config.in_channels, lat, lat, device=device)
        emb = torch.zeros(cfg_batch, 1, unet.config.cross_attention_dim, device=device)
        clip_px = torch.zeros(1, 3, encoder.config.image_size, encoder.config.image_size, device=device)
        out = {"unet_call": _count(lambda: unet(latent.repeat(cfg_batch, 1, 1, 1), 500, encoder_hidden_states=emb)),
               "vae_decode": _count(lambda: vae.decode(latent[:, : vae.config.latent_channels])),
               "clip_encode": _count(lambda: encoder(clip_px))}
        if tiny is not None:
            out["tiny_vae_decode"] = _count(lambda: tiny.decode(latent[:, : tiny.config.latent_channels]))
        return out

    tiny_config = AutoencoderTiny.load_config(tiny_vae_dir) if tiny_vae_dir else None
    if model != "stub":
        try:
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(plain.unet.config)
                vae = type(plain.vae).from_config(plain.vae.config)
                encoder = CLIPVisionModelWithProjection(plain.image_encoder.config)
                tiny = AutoencoderTiny.from_config(tiny_config) if tiny_config else None
            return {**components(unet, vae, encoder, tiny, "meta"), "method": "FlopCounterMode on the meta device"}
        except Exception as e:  # noqa: BLE001 - fall back to counting on the real device
            meta_error = error_text(e)
    else:
        meta_error = None
    device = plain.device
    tiny = AutoencoderTiny.from_pretrained(tiny_vae_dir).to(device).eval() if tiny_vae_dir else None
    out = components(plain.unet, plain.vae, plain.image_encoder, tiny, device)
    method = f"FlopCounterMode on {device} (fp32 plain pipeline, batch 1)"
    if meta_error:
        method += f"; the meta device failed: {meta_error}"
    return {**out, "method": method}


def denoising_calls(scheduler_cls, scheduler_config, steps: int) -> int:
    """UNet calls of one generation: len(timesteps) (PNDM with skip_prk_steps makes one more than steps)."""
    sched = scheduler_cls.from_config(scheduler_config)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def add_bounds(rows: list[dict], plain_rows: list[dict], flops: dict, peak: dict, plain_calls: int,
               scheduler_cls: type, scheduler_config: dict) -> None:
    """FLOPs per image, FLOP bound (img/s at the peak FLOP/s) and achieved fraction of every row and of the
    plain call, in place; and each measured row's ratio to the plain call at its batch, split into less work
    (fewer FLOPs per image) and faster work (more FLOP/s)."""
    def per_image(calls: int, decode: str) -> float:
        return calls * flops["unet_call"] + flops[decode] + flops["clip_encode"]

    plain_by_batch = {p["batch"]: p for p in plain_rows}
    for p in plain_rows:
        p["flops_per_image"] = per_image(plain_calls, "vae_decode")
        p["bound_img_s"] = peak["flop_s"]["fp32"] / p["flops_per_image"]
        p["achieved_fraction"] = p["img_s"] / p["bound_img_s"]
    for r in rows:
        r["unet_calls"] = denoising_calls(scheduler_cls, scheduler_config, r["steps"])
        r["flops_per_image"] = per_image(r["unet_calls"], "tiny_vae_decode" if r["tiny_vae"] else "vae_decode")
        r["peak_flop_s"] = peak["flop_s"][r["dtype"]]
        r["bound_img_s"] = r["peak_flop_s"] / r["flops_per_image"]
        if r["status"] == "ok":
            r["plain_img_s"] = plain_by_batch[r["batch"]]["img_s"]
            r["x_plain"] = r["img_s"] / r["plain_img_s"]
            # x_plain = (plain FLOPs / row FLOPs per image: less work) x (row FLOP/s / plain FLOP/s: faster work)
            r["x_plain_work"] = plain_by_batch[r["batch"]]["flops_per_image"] / r["flops_per_image"]
            r["x_plain_flop_s"] = r["x_plain"] / r["x_plain_work"]
            r["achieved_fraction"] = r["img_s"] / r["bound_img_s"]
