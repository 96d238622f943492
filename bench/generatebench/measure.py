"""The measurements of bench/generate.py: the plain diffusers call a user would write, and each row's
generator against its bare pipe() call; with the pipelines they need."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, StableDiffusionImageVariationPipeline
from gencalls import GeneratorCalls
from PIL import Image
from timing import Timer, in_turns

from onlinemix.core.config import GeneratorConfig
from onlinemix.generation.generator import (
    FULL_SIZE_RANDOM,
    DiffusersVariationGenerator,
    GeneratorError,
    dtype_argument,
    model_location,
)
from onlinemix.generation.stub import build_full_size_random_pipeline, build_stub_pipeline

from .matrix import Spec
from .peakmem import PeakMemory

PLAIN_STEPS = 50  # StableDiffusionImageVariationPipeline.__call__'s default num_inference_steps


def build_generator(cfg: GeneratorConfig, device: torch.device, resolution: int
                    ) -> tuple[DiffusersVariationGenerator, str]:
    """The SD image-variation generator (the one the plain call is compared with) and why it chose its attention."""
    gen = DiffusersVariationGenerator(cfg, device, resolution)
    return gen, str(getattr(gen, "attention_reason", ""))


def free(device: torch.device) -> None:
    """Hand the memory of the pipelines dropped so far back, before the next one loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_text(e: BaseException) -> str:
    """An exception as one short line for a row's reason: its class and the first line of its message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{e.__class__.__name__}: {first[:300]}"


def make_images(n: int, resolution: int) -> torch.Tensor:
    """Random uint8 images (speed does not depend on their content), as a producer passes them: on the CPU."""
    return torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def build_random_tiny_vae(directory: Path, plain: StableDiffusionImageVariationPipeline) -> str:
    """A random-weight AutoencoderTiny whose upsampling matches the pipeline's VAE, saved to ``directory``."""
    factor = plain.vae_scale_factor
    latent_channels = plain.vae.config.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if factor == 8:  # the taesd architecture (madebyollin/taesd): AutoencoderTiny's defaults
            tiny = AutoencoderTiny(latent_channels=latent_channels)
        else:  # n blocks upsample 2^(n-1)x: two 8-channel blocks for the stub's 2x VAE
            n = int(math.log2(factor)) + 1
            tiny = AutoencoderTiny(encoder_block_out_channels=(8,) * n, decoder_block_out_channels=(8,) * n,
                                   num_encoder_blocks=(1,) * n, num_decoder_blocks=(1,) * n,
                                   latent_channels=latent_channels)
    tiny.save_pretrained(directory)
    return str(directory)


def tiny_vae_choice(args: argparse.Namespace, device: torch.device, plain: StableDiffusionImageVariationPipeline,
                    scratch: Path) -> tuple[str | None, str]:
    """The tiny VAE directory of the tiny-VAE rows (None: no such rows) and where it comes from, by --tiny-vae:
    'off'; 'auto' builds a random-weight one into ``scratch`` on the CPU, with --quick or with a
    random-weight model; else a local directory."""
    if args.tiny_vae == "off":
        return None, "off"
    if args.tiny_vae == "auto":
        if device.type == "cpu" or args.quick or args.model in ("stub", FULL_SIZE_RANDOM):
            return build_random_tiny_vae(scratch / "tiny-vae", plain), (
                "random-weight AutoencoderTiny built in a temporary directory"
                + (" (taesd architecture)" if plain.vae_scale_factor == 8 else " (two 8-channel blocks, 2x)"))
        return None, "off (auto: a hub model on a GPU; give --tiny-vae DIR)"
    if not (Path(args.tiny_vae) / "config.json").is_file():
        sys.exit(f"bench/generate.py: --tiny-vae {args.tiny_vae}: not a local AutoencoderTiny directory "
                 f"(no config.json)")
    return str(Path(args.tiny_vae).resolve()), f"local directory {args.tiny_vae}"


def build_plain(args: argparse.Namespace, device: torch.device) -> StableDiffusionImageVariationPipeline:
    """The pipeline a user gets: fp32 weights (the same as the generator's), its default scheduler."""
    if args.model == "stub":
        plain = build_stub_pipeline(GeneratorConfig.stub_seed)
    elif args.model == FULL_SIZE_RANDOM:
        plain = build_full_size_random_pipeline(seed=GeneratorConfig.stub_seed, device=device)
    else:
        plain = StableDiffusionImageVariationPipeline.from_pretrained(
            model_location(args.model), revision=args.revision or GeneratorConfig.revision, safety_checker=None,
            requires_safety_checker=False, **dtype_argument(torch.float32))  # weights stored in fp16 load as such
    plain.set_progress_bar_config(disable=True)  # the only change from a naive call: no tqdm on stderr
    return plain.to(device)


def measure_plain(plain: StableDiffusionImageVariationPipeline, pil: list[Image.Image], batch: int, size: int,
                  args: argparse.Namespace, device: torch.device) -> dict:
    """``plain(pil_images, guidance_scale=k)``: PIL in (the CLIP processor runs), PIL out, default steps."""
    images = pil[:batch]
    size_kwargs = {} if size == plain.unet.config.sample_size * plain.vae_scale_factor else \
        {"height": size, "width": size}
    steps_kwargs = {} if args.plain_steps == PLAIN_STEPS else {"num_inference_steps": args.plain_steps}

    def call():
        return plain(images, guidance_scale=args.guidance, **size_kwargs, **steps_kwargs)

    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.plain_repeats):
        with Timer(device) as t:
            out = call()
        times.append(t.seconds)
    with PeakMemory(device) as mem:  # one more call, untimed: on the CPU the measurement itself slows the call
        call()
    assert len(out.images) == batch and isinstance(out.images[0], Image.Image)
    s = statistics.median(times)
    return {"batch": batch, "img_s": batch / s, "call_s": times, "peak_mem_bytes": mem.bytes,
            "peak_mem_over_start_bytes": mem.over_start, "peak_mem_kind": mem.kind,
            "call": "plain(pil_images, guidance_scale={:g}{})".format(
                args.guidance, "".join(f", {k}={v}" for k, v in {**size_kwargs, **steps_kwargs}.items()))}


def measure_row(label: str, spec: Spec, args: argparse.Namespace, device: torch.device, images: torch.Tensor,
                tiny_vae_dir: str | None, unavailable: dict[str, str]) -> dict:
    """One row: a generator built with ``spec``'s settings, its generate() and bare pipe() calls alternating after
    the warm-up, and the peak memory of one more generate() call. An attention backend that does not load is
    an 'unavailable' row (and every later row asking for it too), a row that fails an 'error' row."""
    row = {"factor": label, **dataclasses.asdict(spec), "tiny_vae_path": tiny_vae_dir if spec.tiny_vae else "",
           "status": "ok", "reason": ""}
    if spec.attention in unavailable:
        return {**row, "status": "unavailable", "reason": unavailable[spec.attention]}
    cfg = GeneratorConfig(model=args.model, revision=args.revision or GeneratorConfig.revision, steps=spec.steps,
                          guidance=args.guidance, scheduler=args.scheduler, dtype=spec.dtype,
                          attention=spec.attention, batch_size=spec.batch, channels_last=spec.channels_last,
                          compile=spec.compile, tiny_vae=tiny_vae_dir if spec.tiny_vae else "")
    gen = calls = None
    try:
        if spec.compile:
            torch._dynamo.reset()  # every row compiles a new UNet: keep earlier rows' guards out of the cache limit
        try:
            gen, reason = build_generator(cfg, device, args.resolution)
        except GeneratorError as e:  # the requested attention backend does not load here
            unavailable[spec.attention] = str(e)
            return {**row, "status": "unavailable", "reason": str(e)}
        row.update(attention_used=gen.attention, attention_reason=reason, gen_size=gen.gen_size,
                   torch_dtype=str(gen.dtype).replace("torch.", ""), fingerprint=gen.fingerprint)
        calls = GeneratorCalls(gen, images, spec.batch, spec.steps, args.guidance, device)
        in_turns((calls.wrapper, calls.bare), args.warmup + (2 if spec.compile else 0))  # warm-up
        wrapper_s, bare_s = in_turns((calls.wrapper, calls.bare), args.repeats)
        # Peak memory of one more generate() call, untimed: on the CPU, handing free pages back to the OS
        # first (so that the call's allocations show as new RSS) makes that call slower.
        with PeakMemory(device) as mem:
            calls.generate()
        w, b = statistics.median(wrapper_s), statistics.median(bare_s)
        row.update(img_s=spec.batch / w, bare_img_s=spec.batch / b, overhead=w / b, wrapper_call_s=wrapper_s,
                   bare_call_s=bare_s, peak_mem_bytes=mem.bytes, peak_mem_over_start_bytes=mem.over_start,
                   peak_mem_kind=mem.kind, retries=gen.retries)
        return row
    except Exception as e:  # noqa: BLE001 - a row that cannot run (unsupported op, OOM, compiler) is recorded
        return {**row, "status": "error", "reason": error_text(e)}
    finally:
        gen = calls = None  # drop the pipeline before the next row loads its own
        free(device)
