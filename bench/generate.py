"""Generation speed of the package's generator against the plain diffusers call, in one run on one device.

    python bench/generate.py                       # tiny stub diffuser; CUDA if available, else CPU
    python bench/generate.py --quick               # < 60 s on 2 CPU cores; what tests/test_bench_generate.py runs
    python bench/generate.py --full-size           # the real architecture (random weights) at 512 px: GPU intended
    python bench/generate.py --full-size --compile --batch-sizes 1,16,32 --full-matrix

What is measured, per row of the matrix (each row builds its own ``DiffusersVariationGenerator``):

* ``generate(uint8 images, seeds)`` (the producers' call) and the bare ``gen.pipe(pixels, ...)`` call
  with identical settings on pixels preprocessed in advance, alternating, after warm-up. Rate =
  batch / median call time; CUDA is synchronised at both ends of every timed call. wrapper/bare is
  the wrapper's overhead.
* peak memory of one more, untimed generate() call: ``torch.cuda.max_memory_allocated`` on CUDA
  (weights included); on the CPU the peak RSS delta of that call, read from /proc/self/status
  (VmHWM after the call, reset through /proc/self/clear_refs before it, minus VmRSS before it; free
  heap pages are handed back with glibc's malloc_trim first, so the call's allocations show).
* x plain: the row's images/s over the plain diffusers call at the same batch size, measured in
  the same run: the same weights in fp32, PIL images in (so the CLIP processor runs), PIL images
  out, the pipeline's default scheduler and default num_inference_steps (50), only
  ``guidance_scale`` given: what ``StableDiffusionImageVariationPipeline(...)(pil_images,
  guidance_scale=k)`` gives a user who calls it naively.
* FLOP bound: FLOPs of one generated image (UNet forward per denoising call, at batch 2 when
  guidance > 1, + VAE or tiny-VAE decode + CLIP image encode), counted with
  ``torch.utils.flop_counter.FlopCounterMode``; peak FLOP/s of the device (a table of known GPUs,
  or a measured matmul peak on the CPU and on unknown GPUs, or ``--peak-tflops``); bound img/s =
  peak / FLOPs per image; achieved fraction = measured img/s / bound.

Design (default): one factor at a time around a baseline row. The baseline is the package's
defaults: dtype auto (fp16 on CUDA, fp32 on CPU), SDPA attention, 10 steps, batch 16 (each taken
from its list when there, else the list's first value; the largest batch when 16 is not listed),
compile, channels_last and tiny VAE off. Every other value of every factor gets one row that
differs from the baseline in that factor alone. Last, a 'combined' row joins, for dtype,
attention, compile and channels_last, the value that was fastest in its own rows, at the largest
batch size and the baseline's steps (tiny VAE stays off: it changes the images). ``--full-matrix``
measures the whole cartesian product instead. See bench/README.md.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import ctypes
import dataclasses
import gc
import itertools
import math
import os
import re
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import diffusers
import numpy as np
import torch
from common import (
    BenchParser,
    Timer,
    cpu_snapshot,
    device_name,
    import_pyplot,
    int_list,
    load_line,
    other_cores_since,
    results_path,
    run_meta,
    save_figure,
    save_results,
    setup_torch,
    target,
    target_line,
    torch_meta,
)
from diffusers import AutoencoderTiny, StableDiffusionImageVariationPipeline, UNet2DConditionModel
from PIL import Image
from torch.utils import flop_counter
from tqdm.auto import tqdm
from transformers import CLIPVisionModelWithProjection

from onlinemix.core.config import GeneratorConfig
from onlinemix.generation.generator import (
    FULL_SIZE_RANDOM,
    SCHEDULERS,
    DiffusersVariationGenerator,
    GeneratorError,
    dtype_argument,
    model_location,
    resolve_dtype,
)
from onlinemix.generation.stub import build_full_size_random_pipeline, build_stub_pipeline

TARGET_OVERHEAD = 1.10  # generate() / bare pipe() on the stub, every row
TARGET_PLAIN = 3.0      # x the plain diffusers call, H100-class GPU, batch >= 16
TARGET_BOUND = 0.60     # fraction of the FLOP bound, H100-class GPU, batch >= 16
TARGET_MIN_BATCH = 16
PLAIN_STEPS = 50        # StableDiffusionImageVariationPipeline.__call__'s default num_inference_steps

# Values used when a flag is not given: (default run, --quick run).
DEFAULTS = {
    "steps": ("10,25", "4"),
    "batch_sizes": ("1,4,16", "1,4"),
    "repeats": (5, 2),
    "plain_repeats": (3, 1),
    "warmup": (1, 1),
}
DTYPE_DEFAULTS = {"cpu": "fp32,bf16", "cuda": "fp32,fp16,bf16"}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Dense (no sparsity) peak tensor-core TFLOP/s, per dtype, from NVIDIA's datasheets, whose
# headline tensor figures are "with sparsity": the dense figure is half of it.
#   H100 SXM5 / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/):
#     FP16/BF16 1,979 / 1,513 / 1,671 sparse; TF32 989 / 756 / 835 sparse; FP32 67 / 51 / 60 (no tensor cores).
#   H200 SXM / NVL: NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200/):
#     FP16/BF16 1,979 / 1,671 sparse; TF32 989 / 835 sparse; FP32 67 / 60.
#   A100 (SXM and PCIe, 40 and 80 GB): NVIDIA A100 Tensor Core GPU datasheet
#     (nvidia.com/en-us/data-center/a100/): FP16/BF16 624 sparse (312 dense); TF32 312 sparse; FP32 19.5.
# Matched against torch.cuda.get_device_name() in this order (the first substring found wins).
GPU_PEAK_TFLOPS = [
    ("H100 NVL", "NVIDIA H100 NVL", {"fp16": 835.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", "NVIDIA H100 PCIe", {"fp16": 756.5, "bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    ("H100", "NVIDIA H100 SXM5", {"fp16": 989.5, "bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("H200 NVL", "NVIDIA H200 NVL", {"fp16": 835.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", "NVIDIA H200 SXM", {"fp16": 989.5, "bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("A100", "NVIDIA A100", {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]
H100_CLASS = ("H100", "H200")


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/generate.py",
        description="Measure the images/s of the package's generator (DiffusersVariationGenerator.generate)\n"
                    "over a matrix of speed options, next to the bare pipe(...) call (wrapper overhead), the\n"
                    "plain diffusers call a user would write (fp32, PIL in and out, default scheduler and 50\n"
                    "steps) and the FLOP bound of the device.",
        epilog="Design: one factor at a time around a baseline row (the package's defaults: dtype auto,\n"
               "sdpa, 10 steps, batch 16, compile/channels_last/tiny VAE off, each taken from its list when\n"
               "listed), then a 'combined' row of the fastest values; --full-matrix measures every\n"
               "combination instead. Flags left out take the default run's value, or the --quick value\n"
               "when --quick is given (shown as 'default / quick'). Results: a table on stdout, JSON at\n"
               "--out and a PNG plot next to it. Progress bars go to stderr.",
        defaults=DEFAULTS,
        quick_help="shrink every list and repeat count so the run takes well under 60 s on 2 CPU cores "
                   "(smoke test); the numbers are then noisy")
    q = p.default_note
    p.add_argument("--model", default=None,
                   help="generator: 'stub' (tiny random-weight StableDiffusionImageVariationPipeline, the default), "
                        "'full-size-random' (the real architecture with random weights) or a hub id / local "
                        "directory, e.g. lambdalabs/sd-image-variations-diffusers")
    p.add_argument("--full-size", action="store_true",
                   help="same as --model full-size-random: the real model's architecture (about 1.2B parameters) "
                        "with random weights, at 512 px by default. Meant for a GPU; on the CPU it runs but a "
                        "single 512 px image takes minutes")
    p.add_argument("--revision", default=None, help="hub revision of --model (default: the package's, v2.0)")
    p.add_argument("--resolution", type=int, default=None,
                   help="side in pixels of the input and output images; the generator rounds it up to a "
                        "multiple of 8 and of the VAE factor, as the package does, and the plain call generates "
                        "at that same size (default 32 for the stub, 512 otherwise)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale k for every call, the plain call included; k > 1 runs the "
                        "UNet on a doubled batch (default 3.0, the package's generator.guidance)")
    p.add_argument("--scheduler", default="dpm++", choices=tuple(SCHEDULERS),
                   help="the generator's sampler (default dpm++, the package's); the plain call always keeps the "
                        "pipeline's own default scheduler")
    p.add_torch_flags("The CPU matmul peak is measured with the same thread count")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated generator precisions among fp32, fp16, bf16 (default fp32,bf16 on CPU, "
                        "where fp16 convolutions may be unsupported or slow; fp32,fp16,bf16 on CUDA)")
    p.add_argument("--attentions", default="sdpa,xformers",
                   help="comma-separated attention backends among sdpa, xformers, auto (default sdpa,xformers). "
                        "A backend that does not load is recorded as an 'unavailable' row, never an error")
    p.add_argument("--steps", default=None, help=f"comma-separated denoising step counts {q('steps')}")
    p.add_argument("--batch-sizes", default=None, help=f"comma-separated images per call {q('batch_sizes')}")
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile of the UNet (generator.compile=true); off by default because "
                        "compiling takes from tens of seconds (CPU, stub) to minutes (GPU, full size). Compile "
                        "rows get two extra warm-up calls")
    p.add_argument("--channels-last", default="off,on",
                   help="comma-separated channels_last settings (UNet and VAE memory format) among off, on "
                        "(default off,on)")
    p.add_argument("--tiny-vae", default="auto",
                   help="'auto' (default): on the CPU, with --quick, or with a random-weight model, build a "
                        "random-weight AutoencoderTiny into a temporary directory (the taesd architecture for an "
                        "8x VAE, a two-block one for the stub), so the option is exercised; otherwise no tiny-VAE "
                        "rows. 'off': no tiny-VAE rows. Anything else: a local AutoencoderTiny directory "
                        "(e.g. a download of madebyollin/taesd)")
    p.add_argument("--full-matrix", action="store_true",
                   help="measure every combination of the lists above instead of one factor at a time")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls per row, of generate() and of the bare pipe() each, alternating, after the "
                        f"warm-up; the rate uses the median call {q('repeats')}")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed calls of each before timing a row or the plain call {q('warmup')}")
    p.add_argument("--plain-repeats", type=int, default=None,
                   help=f"timed plain diffusers calls per batch size, after the warm-up {q('plain_repeats')}")
    p.add_argument("--plain-steps", type=int, default=PLAIN_STEPS,
                   help=f"num_inference_steps of the plain call (default {PLAIN_STEPS}, the pipeline's own default: "
                        f"change it only to make --full-size affordable on a CPU; the ratio then no longer "
                        f"compares against what a naive call gets)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s of the device for every dtype, overriding the built-in GPU table "
                        "(H100 SXM/PCIe/NVL, H200, A100) and the measured matmul peak")
    args = p.parse(argv)
    if args.full_size:
        if args.model not in (None, FULL_SIZE_RANDOM):
            p.error(f"--full-size means --model {FULL_SIZE_RANDOM}; it cannot be combined with --model {args.model}")
        args.model = FULL_SIZE_RANDOM
    args.model = args.model or "stub"
    if args.resolution is None:
        args.resolution = 32 if args.model == "stub" else 512
    args.steps = list(dict.fromkeys(int_list(p, "--steps", args.steps)))
    args.batch_sizes = list(dict.fromkeys(int_list(p, "--batch-sizes", args.batch_sizes)))
    args.attentions = _choice_list(p, "--attentions", args.attentions, ("sdpa", "xformers", "auto"))
    args.channels_last = [v == "on" for v in _choice_list(p, "--channels-last", args.channels_last, ("off", "on"))]
    if args.dtypes is not None:
        args.dtypes = _choice_list(p, "--dtypes", args.dtypes, ("fp32", "fp16", "bf16"))
    p.require_at_least(args, 1, "repeats", "plain_repeats", "plain_steps", "resolution")
    p.require_at_least(args, 0, "warmup")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    if args.guidance < 0:
        p.error("--guidance must be >= 0")
    return args


def _choice_list(p: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        p.error(f"{flag} expects comma-separated values among {', '.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------- helpers

def _proc_status_kib(*keys: str) -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)\s+kB", text, re.M).group(1)) for k in keys}


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Give free heap pages back to the OS (glibc), so that a call's allocations show up as new RSS."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory of the code inside ``with``: CUDA max_memory_allocated, or the CPU's peak RSS delta (/proc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self.over_start: int | None = None
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            self.trimmed = _malloc_trim()
            self.reset = _reset_peak_rss()
            self.start = _proc_status_kib("VmRSS", "VmHWM")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            self.over_start = self.bytes - self.start
            self.kind = "cuda max_memory_allocated (weights included)"
        else:
            hwm = _proc_status_kib("VmHWM")["VmHWM"]
            if self.reset:
                self.bytes = max(0, hwm - self.start["VmRSS"]) * 1024
                self.kind = ("CPU peak RSS delta of one call (/proc/self/status: VmHWM after the call minus VmRSS "
                             "before it; VmHWM reset via /proc/self/clear_refs"
                             + (", free heap returned first with malloc_trim)" if self.trimmed else
                                "; malloc_trim unavailable: pages the allocator kept are not counted)"))
            else:  # VmHWM could not be reset: only growth beyond the process's earlier high-water mark shows
                self.bytes = max(0, hwm - self.start["VmHWM"]) * 1024
                self.kind = "CPU VmHWM growth (/proc; clear_refs unavailable: a lower bound)"
            self.over_start = self.bytes


def build_generator(cfg: GeneratorConfig, device: torch.device, resolution: int
                    ) -> tuple[DiffusersVariationGenerator, str]:
    """The SD image-variation generator (the one the plain call is compared with) and why it chose its attention."""
    gen = DiffusersVariationGenerator(cfg, device, resolution)
    return gen, str(getattr(gen, "attention_reason", ""))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{e.__class__.__name__}: {first[:300]}"


# ----------------------------------------------------------------------------- peak FLOP/s

def measure_matmul_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """Best FLOP/s of a large square matmul in ``dtype`` with the current thread count ('measured matmul peak')."""
    sizes = ([1024] if quick else [1024, 2048]) if device.type == "cpu" else [8192]
    reps = 5 if device.type == "cpu" else 20
    best = 0.0
    with torch.inference_mode():
        for n in sizes:
            gen = torch.Generator(device).manual_seed(0)
            a = torch.randn(n, n, device=device, generator=gen).to(dtype)
            b = torch.randn(n, n, device=device, generator=gen).to(dtype)
            a @ b  # warm-up: kernel selection, page faults
            for _ in range(reps):
                with Timer(device) as t:
                    a @ b
                best = max(best, 2 * n ** 3 / t.seconds)
            del a, b
    return best


def peak_flops(device: torch.device, dtypes: list[str], override_tflops: float | None, quick: bool) -> dict:
    """Peak FLOP/s per dtype name, with where each number comes from."""
    per_dtype, sources = {}, {}
    name = device_name(device)
    table = next(((label, row) for key, label, row in GPU_PEAK_TFLOPS if key in name), None) \
        if device.type == "cuda" else None
    for d in dtypes:
        if override_tflops is not None:
            per_dtype[d], sources[d] = override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
        elif table is not None:
            label, row = table
            if d == "fp32":
                # cuDNN convolutions (most of the UNet and VAE) run in TF32 unless disabled, matmuls only when allowed.
                tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
                key = "tf32" if tf32 else "fp32"
            else:
                key = d
            per_dtype[d] = row[key] * 1e12
            sources[d] = f"datasheet: {label} dense {key.upper()} {row[key]:g} TFLOP/s"
        else:
            per_dtype[d] = measure_matmul_peak(device, getattr(torch, {"fp32": "float32", "fp16": "float16",
                                                                       "bf16": "bfloat16"}[d]), quick)
            where = f"{torch.get_num_threads()} thread(s)" if device.type == "cpu" else "device not in the table"
            sources[d] = f"measured matmul peak ({d}, {where})"
    return {"flop_s": per_dtype, "source": sources}


# ----------------------------------------------------------------------------- FLOP count

def _flop_mapping() -> dict:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU one, which it would count as 0 FLOPs."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flop} if op is not None else {}


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)  # the formula of the CUDA kernels


def _count(fn) -> int:
    with torch.inference_mode(), FlopCounter() as fc:
        fn()
    return int(fc.get_total_flops())


class FlopCounter(flop_counter.FlopCounterMode):
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
            meta_error = _error_text(e)
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


# ----------------------------------------------------------------------------- the matrix

FACTORS = ("dtype", "attention", "steps", "batch", "compile", "channels_last", "tiny_vae")


@dataclasses.dataclass(frozen=True)
class Spec:
    dtype: str
    attention: str
    steps: int
    batch: int
    compile: bool
    channels_last: bool
    tiny_vae: bool

    def differs(self, other: "Spec") -> list[str]:
        return [f for f in FACTORS if getattr(self, f) != getattr(other, f)]


def factor_values(args, dtypes: list[str], tiny_vae_dir: str | None) -> dict[str, list]:
    return {"dtype": dtypes, "attention": args.attentions, "steps": args.steps, "batch": args.batch_sizes,
            "compile": [False, True] if args.compile else [False], "channels_last": args.channels_last,
            "tiny_vae": [False, True] if tiny_vae_dir else [False]}


def baseline_spec(values: dict[str, list], device: torch.device) -> Spec:
    def pick(factor: str, preferred):
        return preferred if preferred in values[factor] else values[factor][0]
    auto_dtype = DTYPE_NAMES[resolve_dtype("auto", device)]
    batch = 16 if 16 in values["batch"] else max(values["batch"])
    return Spec(dtype=pick("dtype", auto_dtype), attention=pick("attention", "sdpa"), steps=pick("steps", 10),
                batch=batch, compile=pick("compile", False), channels_last=pick("channels_last", False),
                tiny_vae=pick("tiny_vae", False))


def design(values: dict[str, list], base: Spec, full: bool) -> list[tuple[str, Spec]]:
    """(label, spec) rows: the cartesian product, or the baseline plus one row per other value of each factor."""
    if full:
        specs = [Spec(*combo) for combo in itertools.product(*(values[f] for f in FACTORS))]
        rows = [("baseline" if s == base else "full", s) for s in specs]
        return sorted(rows, key=lambda r: r[0] != "baseline")
    rows = [("baseline", base)]
    for factor in FACTORS:
        for v in values[factor]:
            spec = dataclasses.replace(base, **{factor: v})
            if spec != base:
                rows.append((factor, spec))
    return rows


def combined_spec(rows: list[dict], base: Spec, values: dict[str, list]) -> tuple[Spec, int | None]:
    """For dtype, attention, compile and channels_last: the value fastest in its own one-factor rows (baseline
    included), at the largest batch and the baseline's steps, tiny VAE off; and the index of the row that
    already measured that combination, if one did."""
    chosen = {}
    for factor in ("dtype", "attention", "compile", "channels_last"):
        candidates = [r for r in rows if r["status"] == "ok" and r["factor"] in ("baseline", factor)]
        if candidates:
            chosen[factor] = max(candidates, key=lambda r: r["img_s"])[factor]
    spec = dataclasses.replace(base, batch=max(values["batch"]), tiny_vae=False, **chosen)
    same = [i for i, r in enumerate(rows) if Spec(**{f: r[f] for f in FACTORS}) == spec]
    return spec, (same[0] if same else None)


# ----------------------------------------------------------------------------- measurements

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


def build_plain(args, device: torch.device) -> StableDiffusionImageVariationPipeline:
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
                  args, device: torch.device) -> dict:
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


def measure_row(label: str, spec: Spec, args, device: torch.device, images: torch.Tensor, tiny_vae_dir: str | None,
                unavailable: dict[str, str]) -> dict:
    row = {"factor": label, **dataclasses.asdict(spec), "tiny_vae_path": tiny_vae_dir if spec.tiny_vae else "",
           "status": "ok", "reason": ""}
    if spec.attention in unavailable:
        return {**row, "status": "unavailable", "reason": unavailable[spec.attention]}
    cfg = GeneratorConfig(model=args.model, revision=args.revision or GeneratorConfig.revision, steps=spec.steps,
                          guidance=args.guidance, scheduler=args.scheduler, dtype=spec.dtype,
                          attention=spec.attention, batch_size=spec.batch, channels_last=spec.channels_last,
                          compile=spec.compile, tiny_vae=tiny_vae_dir if spec.tiny_vae else "")
    gen = None
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
        batch = images[torch.arange(spec.batch) % images.shape[0]].contiguous()
        seeds = list(range(spec.batch))
        with torch.inference_mode():
            pixels = gen.preprocess(batch)  # the bare call gets already-preprocessed pixels on the device

        def bare() -> float:
            generators = [torch.Generator(gen.device).manual_seed(s) for s in seeds]
            with torch.inference_mode(), Timer(device) as t:
                gen.pipe(pixels, height=gen.gen_size, width=gen.gen_size, num_inference_steps=spec.steps,
                         guidance_scale=args.guidance, generator=generators, output_type="pt")
            return t.seconds

        def wrapper() -> float:
            with Timer(device) as t:
                gen.generate(batch, seeds)
            return t.seconds

        for _ in range(args.warmup + (2 if spec.compile else 0)):
            wrapper(), bare()
        wrapper_s, bare_s = [], []
        for _ in range(args.repeats):
            wrapper_s.append(wrapper())
            bare_s.append(bare())
        # Peak memory of one more generate() call, untimed: on the CPU, handing free pages back to the OS
        # first (so that the call's allocations show as new RSS) makes that call slower.
        with PeakMemory(device) as mem:
            gen.generate(batch, seeds)
        w, b = statistics.median(wrapper_s), statistics.median(bare_s)
        row.update(img_s=spec.batch / w, bare_img_s=spec.batch / b, overhead=w / b, wrapper_call_s=wrapper_s,
                   bare_call_s=bare_s, peak_mem_bytes=mem.bytes, peak_mem_over_start_bytes=mem.over_start,
                   peak_mem_kind=mem.kind, retries=gen.retries)
        return row
    except Exception as e:  # noqa: BLE001 - a row that cannot run (unsupported op, OOM, compiler) is recorded
        return {**row, "status": "error", "reason": _error_text(e)}
    finally:
        gen = None  # drop the pipeline before the next row loads its own
        _free(device)


# ----------------------------------------------------------------------------- targets

def evaluate_targets(res: dict) -> list[dict]:
    m, rows = res["meta"], [r for r in res["rows"] if r["status"] == "ok"]
    stub = res["config"]["model"] == "stub"
    # 1. wrapper overhead on the stub, every measured row
    name = f"wrapper overhead generate()/pipe() <= {TARGET_OVERHEAD:.2f}x on the stub (every row)"
    if rows:
        worst = max(rows, key=lambda r: r["overhead"])
        base = next((r for r in rows if r["factor"] == "baseline"), None)
        detail = (f"worst {worst['overhead']:.3f}x ({row_name(worst)})"
                  + (f", baseline {base['overhead']:.3f}x" if base else "")
                  + f", median {statistics.median(r['overhead'] for r in rows):.3f}x"
                  + ("" if stub else f" (model {res['config']['model']}, the target is for the stub)"))
        targets = [target(name, worst["overhead"], TARGET_OVERHEAD, "<=", detail, measured=stub)]
    else:
        targets = [target(name, None, TARGET_OVERHEAD, "<=", "no row ran")]
    # 2./3. H100-class GPU, batch >= 16: x plain and fraction of the FLOP bound
    big = [r for r in rows if r["batch"] >= TARGET_MIN_BATCH and r.get("x_plain")]
    h100 = m["device"].startswith("cuda") and any(k in m["device_name"] for k in H100_CLASS)
    for key, threshold, name, fmt in (
            ("x_plain", TARGET_PLAIN, f">= {TARGET_PLAIN:g}x the plain diffusers call at batch >= "
                                      f"{TARGET_MIN_BATCH} (H100-class GPU)", "{:.2f}x"),
            ("achieved_fraction", TARGET_BOUND, f">= {TARGET_BOUND:.0%} of the FLOP bound at batch >= "
                                                f"{TARGET_MIN_BATCH} (H100-class GPU)", "{:.1%}")):
        best = max(big, key=lambda r: r[key]) if big else None
        detail = f"best here {fmt.format(best[key])} ({row_name(best)})" if best else f"no row at batch >= {TARGET_MIN_BATCH}"
        if not h100:
            detail = f"{m['device']} is {m['device_name']}, not an H100-class GPU; {detail}"
        elif stub:
            detail += "; model stub: run --full-size for the real test"
        targets.append(target(name, best[key] if best else None, threshold, ">=", detail, measured=h100))
    return targets


def row_name(r: dict) -> str:
    return (f"{r['dtype']} {r['attention']} {r['steps']} steps b={r['batch']}"
            + (" compile" if r["compile"] else "") + (" channels_last" if r["channels_last"] else "")
            + (" tiny-vae" if r["tiny_vae"] else ""))


# ----------------------------------------------------------------------------- output

def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}" if b >= 10 * 2**20 else f"{b / 2**20:.2f}"


def format_report(res: dict) -> str:
    m, c, fl, pk = res["meta"], res["config"], res["flops"], res["peak"]
    mem_kind = next((r["peak_mem_kind"] for r in res["rows"] if r.get("peak_mem_kind")), "")
    lines = [
        f"device      {m['device']}: {m['device_name']}",
        f"threads     torch.get_num_threads() = {m['threads']}"
        + (" (the default on CPU: rates are per core)" if m["device"] == "cpu" and m["threads_default"] else ""),
        f"versions    torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}",
        f"generator   {c['model']}, {c['resolution']}px in -> {c['gen_size']}px generated, guidance {c['guidance']:g}, "
        f"{c['scheduler']}; design: {c['design']}",
        f"date        {m['date']}",
        load_line(m),
        f"FLOPs       per image: UNet {fl['unet_call'] / 1e9:,.4g} GFLOP per denoising call (batch "
        f"{fl['unet_batch']} for guidance), VAE decode {fl['vae_decode'] / 1e9:,.4g}"
        + (f", tiny VAE decode {fl['tiny_vae_decode'] / 1e9:,.4g}" if "tiny_vae_decode" in fl else "")
        + f", CLIP encode {fl['clip_encode'] / 1e9:,.4g} GFLOP ({fl['method']})",
        "peak        " + "; ".join(f"{d} {pk['flop_s'][d] / 1e12:,.3g} TFLOP/s ({pk['source'][d]})" for d in pk["flop_s"]),
        f"memory      {mem_kind}",
        "",
        f"Plain diffusers call: fp32, PIL in and out, {c['plain_scheduler']}, {c['plain_steps']} steps "
        f"({c['plain_unet_calls']} UNet calls), {res['plain']['call']}",
        f"  {'batch':>5}  {'img/s':>9}  {'GFLOP/img':>10}  {'bound img/s':>11}  {'% bound':>8}  {'peak MiB':>9}",
    ]
    for p in res["plain"]["rows"]:
        lines.append(f"  {p['batch']:>5}  {p['img_s']:>9.3f}  {p['flops_per_image'] / 1e9:>10,.4g}  "
                     f"{p['bound_img_s']:>11,.4g}  {100 * p['achieved_fraction']:>7.3g}%  {_mib(p['peak_mem_bytes']):>9}")
    lines += [
        "",
        "Generator rows: generate() rate, bare pipe() rate, wrapper/bare, x plain at the same batch, FLOP bound "
        "(median call)",
        f"  {'#':>2}  {'row':<13}  {'dtype':<5}  {'attn':<8}  {'steps':>5}  {'batch':>5}  {'comp':<4}  {'c_last':<6}  "
        f"{'tvae':<4}  {'img/s':>9}  {'bare img/s':>10}  {'wrap/bare':>9}  {'x plain':>8}  {'bound img/s':>11}  "
        f"{'% bound':>8}  {'peak MiB':>9}",
    ]
    onoff = lambda v: "on" if v else "off"  # noqa: E731
    for i, r in enumerate(res["rows"]):
        head = (f"  {i:>2}  {r['factor']:<13}  {r['dtype']:<5}  {r['attention']:<8}  {r['steps']:>5}  {r['batch']:>5}  "
                f"{onoff(r['compile']):<4}  {onoff(r['channels_last']):<6}  {onoff(r['tiny_vae']):<4}")
        if r["status"] != "ok":
            lines.append(f"{head}  {r['status']}: {r['reason'][:110]}")
            continue
        lines.append(f"{head}  {r['img_s']:>9.2f}  {r['bare_img_s']:>10.2f}  {r['overhead']:>8.3f}x  "
                     f"{r['x_plain']:>7.2f}x  {r['bound_img_s']:>11,.4g}  {100 * r['achieved_fraction']:>7.3g}%  "
                     f"{_mib(r['peak_mem_bytes']):>9}")
    for i, r in enumerate(res["rows"]):
        if r.get("retries"):
            lines.append(f"  row {i}: generate() regenerated {r['retries']} non-finite or blank image(s) over the "
                         f"row's calls; its rate includes that work, the bare pipe() call's does not")
    base = next((r for r in res["rows"] if r["factor"] == "baseline" and r["status"] == "ok"), None)
    if base:
        lines.append(f"  x plain splits into less work and faster work: baseline {base['x_plain']:.2f}x = "
                     f"{base['x_plain_work']:.2f}x fewer FLOPs per image ({base['unet_calls']} vs "
                     f"{c['plain_unet_calls']} UNet calls) x {base['x_plain_flop_s']:.2f}x the plain call's FLOP/s")
    cb = c.get("combined")
    if cb and cb["measured_as"] != "combined":
        lines.append(f"  combined (the fastest value of dtype, attention, compile, channels_last at the largest batch) "
                     f"= row {cb['row']}, already measured: no extra row")
    lines += ["", "Targets", *(target_line(t) for t in res["targets"])]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/generate.py")
    import matplotlib.ticker

    rows = res["rows"]
    plain = {p["batch"]: p for p in res["plain"]["rows"]}
    labels = [f"{row_name(r)}  [{r['factor']}]" for r in rows] + [f"plain diffusers call b={b}" for b in plain]
    y = np.arange(len(labels))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.32 * len(labels)), sharey=True)
    ok = [i for i, r in enumerate(rows) if r["status"] == "ok"]
    left.barh(y[ok], [rows[i]["img_s"] for i in ok], color="tab:blue", label="generate()")
    tick_y = [y[i] for i in ok if rows[i]["batch"] in plain]
    tick_x = [plain[rows[i]["batch"]]["img_s"] for i in ok if rows[i]["batch"] in plain]
    left.plot(tick_x, tick_y, "|", color="black", ms=14, mew=2, label="plain call, same batch")
    for i in ok:
        if rows[i].get("x_plain"):
            left.text(rows[i]["img_s"], y[i], f" {rows[i]['x_plain']:.2f}x plain", va="center", fontsize=7)
    n = len(rows)
    left.barh(y[n:], [p["img_s"] for p in plain.values()], color="grey", label="plain diffusers call")
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            left.text(0.01, y[i], r["status"], transform=left.get_yaxis_transform(), va="center", fontsize=8,
                      color="tab:red")
    left.set_xscale("log")
    top = max([rows[i]["img_s"] for i in ok] + [p["img_s"] for p in plain.values()], default=1.0)
    left.set_xlim(right=top * 2.5)  # room for the 'x plain' labels
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("images / s (log scale)")
    left.set_title("Generation speed")
    left.set_yticks(y, labels, fontsize=8)
    left.grid(alpha=0.3, axis="x")
    left.legend(fontsize=8, loc="lower right")

    right.barh(y[ok], [100 * rows[i]["achieved_fraction"] for i in ok], color="tab:orange", label="generate()")
    right.barh(y[n:], [100 * p["achieved_fraction"] for p in plain.values()], color="grey")
    right.set_xlabel("% of the FLOP bound (peak FLOP/s / FLOPs per image)")
    right.set_title("Achieved fraction of the FLOP bound")
    right.grid(alpha=0.3, axis="x")
    m, c = res["meta"], res["config"]
    fig.suptitle(f"{m['device']}: {m['device_name']}, {m['threads']} thread(s), {c['model']} at {c['gen_size']}px, "
                 f"guidance {c['guidance']:g}", fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = setup_torch(args.device, args.threads)
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"--device {device}: only cpu and cuda are supported")
    dtypes = args.dtypes or DTYPE_DEFAULTS[device.type].split(",")
    if device.type == "cpu" and args.model != "stub":
        print(f"bench/generate.py: WARNING: {args.model} at {args.resolution}px on the CPU is slow: at 512 px one "
              f"UNet call is about 1.6 TFLOP (seconds on a core) and one 50-step plain-call image takes minutes; "
              f"--quick, --resolution, --steps and --plain-steps shorten it", file=sys.stderr)
    diffusers.utils.logging.set_verbosity_error()  # pipe.to(dtype) notices would flood stderr once per row
    warnings.filterwarnings("ignore", category=FutureWarning)

    out = results_path(args.out, "bench/generate.py", device.type)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before, before = os.getloadavg()[0], cpu_snapshot()
    try:
        plain = build_plain(args, device)
    except Exception as e:  # noqa: BLE001 - no network for a hub id, a missing directory
        sys.exit(f"bench/generate.py: cannot build the pipeline {args.model!r}: {_error_text(e)}")
    multiple = math.lcm(8, plain.vae_scale_factor)
    gen_size = -(-args.resolution // multiple) * multiple  # as DiffusersVariationGenerator rounds it

    tmp = tempfile.TemporaryDirectory(prefix="bench-generate-")
    random_weights = args.model in ("stub", FULL_SIZE_RANDOM)
    if args.tiny_vae == "off":
        tiny_vae_dir, tiny_source = None, "off"
    elif args.tiny_vae == "auto":
        if device.type == "cpu" or args.quick or random_weights:
            tiny_vae_dir = build_random_tiny_vae(Path(tmp.name) / "tiny-vae", plain)
            tiny_source = "random-weight AutoencoderTiny built in a temporary directory" + (
                " (taesd architecture)" if plain.vae_scale_factor == 8 else " (two 8-channel blocks, 2x)")
        else:
            tiny_vae_dir, tiny_source = None, "off (auto: a hub model on a GPU; give --tiny-vae DIR)"
    else:
        if not (Path(args.tiny_vae) / "config.json").is_file():
            sys.exit(f"bench/generate.py: --tiny-vae {args.tiny_vae}: not a local AutoencoderTiny directory "
                     f"(no config.json)")
        tiny_vae_dir, tiny_source = str(Path(args.tiny_vae).resolve()), f"local directory {args.tiny_vae}"

    values = factor_values(args, dtypes, tiny_vae_dir)
    base = baseline_spec(values, device)
    planned = design(values, base, args.full_matrix)
    plain_batches = sorted({s.batch for _, s in planned} | {max(args.batch_sizes)})
    images = make_images(max(args.batch_sizes), args.resolution)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]

    bar = tqdm(total=2 + len(plain_batches) + len(planned) + (0 if args.full_matrix else 1), unit="step",
               dynamic_ncols=True)
    with bar:
        bar.set_description("peak FLOP/s")
        peak = peak_flops(device, sorted(set(dtypes) | {"fp32"}, key=["fp32", "fp16", "bf16"].index),
                          args.peak_tflops, args.quick)
        bar.update()
        bar.set_description("FLOP count")
        flops = count_flops(plain, args.model, gen_size, args.guidance, tiny_vae_dir)
        flops["unet_batch"] = 2 if args.guidance > 1.0 else 1
        bar.update()
        plain_rows = []
        for b in plain_batches:
            bar.set_description(f"plain diffusers call b={b}")
            plain_rows.append(measure_plain(plain, pil, b, gen_size, args, device))
            bar.update()
        plain_scheduler, plain_config = type(plain.scheduler), plain.scheduler.config
        plain_calls = denoising_calls(plain_scheduler, plain_config, args.plain_steps)
        del plain
        _free(device)

        rows, unavailable = [], {}
        for label, spec in planned:
            bar.set_description(f"{label}: {row_name(dataclasses.asdict(spec))}")
            rows.append(measure_row(label, spec, args, device, images, tiny_vae_dir, unavailable))
            bar.update()
        combined = None
        if not args.full_matrix:
            spec, same = combined_spec(rows, base, values)
            if same is None:
                bar.set_description(f"combined: {row_name(dataclasses.asdict(spec))}")
                rows.append(measure_row("combined", spec, args, device, images, tiny_vae_dir, unavailable))
            combined = {**dataclasses.asdict(spec), "row": len(rows) - 1 if same is None else same,
                        "measured_as": "combined" if same is None else rows[same]["factor"]}
            bar.update()
    tmp.cleanup()

    other_cores = other_cores_since(before)

    # FLOPs per image, bound and achieved fraction of every row and of the plain call
    gen_scheduler = SCHEDULERS[args.scheduler]
    per_image = lambda calls, decode: calls * flops["unet_call"] + flops[decode] + flops["clip_encode"]  # noqa: E731
    plain_by_batch = {p["batch"]: p for p in plain_rows}
    for p in plain_rows:
        p["flops_per_image"] = per_image(plain_calls, "vae_decode")
        p["bound_img_s"] = peak["flop_s"]["fp32"] / p["flops_per_image"]
        p["achieved_fraction"] = p["img_s"] / p["bound_img_s"]
    for r in rows:
        r["unet_calls"] = denoising_calls(gen_scheduler, plain_config, r["steps"])
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

    res = {
        "meta": {
            **torch_meta(device, args.threads is None),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            **run_meta(load_before, other_cores, args.quick, "bench/generate.py", argv),
        },
        "config": {
            "model": args.model, "revision": args.revision or GeneratorConfig.revision, "resolution": args.resolution,
            "gen_size": gen_size, "guidance": args.guidance, "scheduler": args.scheduler,
            "design": "full matrix" if args.full_matrix else "one factor at a time around the baseline, then combined",
            "baseline": dataclasses.asdict(base), "combined": combined, "factors": values, "repeats": args.repeats, "warmup": args.warmup,
            "tiny_vae": tiny_source, "plain_steps": args.plain_steps, "plain_unet_calls": plain_calls,
            "plain_scheduler": plain_scheduler.__name__, "plain_repeats": args.plain_repeats,
        },
        "flops": flops,
        "peak": peak,
        "plain": {"rows": plain_rows, "call": plain_rows[0]["call"] if plain_rows else ""},
        "rows": rows,
    }
    res["targets"] = evaluate_targets(res)
    save_results(res, out, plot, format_report, _T0, started, gap=True, after_imports=True)
    return res


def exit_status(res: dict) -> int:
    """1 when a row errored (an unsupported op, out of memory, a compiler failure), else 0: a backend that
    does not load here ('unavailable', e.g. xformers) is a finding, not a failure."""
    errors = [row_name(r) for r in res["rows"] if r["status"] == "error"]
    if errors:
        print(f"bench/generate.py: {len(errors)} row(s) failed: {'; '.join(errors)}", file=sys.stderr)
    return int(bool(errors))


if __name__ == "__main__":
    sys.exit(exit_status(main()))
