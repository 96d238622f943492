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
measures the whole cartesian product instead. See docs/benchmarks.md.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import dataclasses
import math
import sys
import tempfile
import warnings
from pathlib import Path

import diffusers
import torch
from common import BenchParser, choice_list, int_list, output_path, save_results, setup_torch
from generatebench.flops import add_bounds, count_flops, denoising_calls
from generatebench.matrix import baseline_spec, combined_spec, design, factor_values, row_name
from generatebench.measure import (
    PLAIN_STEPS,
    build_plain,
    error_text,
    free,
    make_images,
    measure_plain,
    measure_row,
    tiny_vae_choice,
)
from generatebench.peak import peak_flops
from generatebench.report import evaluate_targets, format_report, plot
from machine import LoadWatch, torch_meta
from PIL import Image
from tqdm.auto import tqdm

from onlinemix.core.config import GeneratorConfig
from onlinemix.generation.generator import FULL_SIZE_RANDOM, SCHEDULERS

# Values used when a flag is not given: (default run, --quick run).
DEFAULTS = {
    "steps": ("10,25", "4"),
    "batch_sizes": ("1,4,16", "1,4"),
    "repeats": (5, 2),
    "plain_repeats": (3, 1),
    "warmup": (1, 1),
}
DTYPE_DEFAULTS = {"cpu": "fp32,bf16", "cuda": "fp32,fp16,bf16"}


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
    args.attentions = choice_list(p, "--attentions", args.attentions, ("sdpa", "xformers", "auto"))
    args.channels_last = [v == "on" for v in choice_list(p, "--channels-last", args.channels_last, ("off", "on"))]
    if args.dtypes is not None:
        args.dtypes = choice_list(p, "--dtypes", args.dtypes, ("fp32", "fp16", "bf16"))
    p.require_at_least(args, 1, "repeats", "plain_repeats", "plain_steps", "resolution")
    p.require_at_least(args, 0, "warmup")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    if args.guidance < 0:
        p.error("--guidance must be >= 0")
    return args


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

    out = output_path(args.out, "bench/generate.py", device.type)
    load = LoadWatch()
    try:
        plain = build_plain(args, device)
    except Exception as e:  # noqa: BLE001 - no network for a hub id, a missing directory
        sys.exit(f"bench/generate.py: cannot build the pipeline {args.model!r}: {error_text(e)}")
    multiple = math.lcm(8, plain.vae_scale_factor)
    gen_size = -(-args.resolution // multiple) * multiple  # as DiffusersVariationGenerator rounds it

    tmp = tempfile.TemporaryDirectory(prefix="bench-generate-")
    tiny_vae_dir, tiny_source = tiny_vae_choice(args, device, plain, Path(tmp.name))
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
        free(device)

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
    load.stop()

    add_bounds(rows, plain_rows, flops, peak, plain_calls, SCHEDULERS[args.scheduler], plain_config)
    res = {
        "meta": {
            **torch_meta(device, args.threads is None),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            **load.meta(args.quick, "bench/generate.py", argv),
        },
        "config": {
            "model": args.model, "revision": args.revision or GeneratorConfig.revision, "resolution": args.resolution,
            "gen_size": gen_size, "guidance": args.guidance, "scheduler": args.scheduler,
            "design": "full matrix" if args.full_matrix else "one factor at a time around the baseline, then combined",
            "baseline": dataclasses.asdict(base), "combined": combined, "factors": values, "repeats": args.repeats,
            "warmup": args.warmup, "tiny_vae": tiny_source, "plain_steps": args.plain_steps,
            "plain_unet_calls": plain_calls, "plain_scheduler": plain_scheduler.__name__,
            "plain_repeats": args.plain_repeats,
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
