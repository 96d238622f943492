"""View augmentation throughput: torchvision per image vs the batched torch backend vs the Triton kernels.

    python bench/augment.py               # 32 and 224 px, batches 64 and 256, every recipe
    python bench/augment.py --quick       # seconds; what tests/test_bench_augment.py runs
    python bench/augment.py --resolutions 224 --batches 256 --recipes mixdiff_real

For each recipe, resolution R and batch B, one run times, side by side:

* torchvision: `augment.build_transform` + `augment.augment_batch`, one v2 call per image, on the CPU
  (what trainers do today), on all B images, or, where that would take more than --torchvision-seconds
  per call (the blurred recipes at 224 px), on as many as fit (at least --torchvision-images): its cost per
  image hardly depends on B;
* torch: `view_params.sample_view_params` + `batch_augment.augment_views` on --device (sampling included),
  into recycled output batches on the CPU (`buffers.RecycledTensors`), as `views.backends.BatchedViews` runs it;
* compiled: the same with hue compiled by TorchInductor (`compiled_ops`; CPU only, skipped by --quick), which
  `train.augment_backend=auto` uses on the CPU for views of at least `COMPILE_MIN_SIZE` px;
* triton: the same parameters through `onlinemix_kernels.augment.augment_views_triton` (CUDA only).

Recipes (crop bound 0.08, as registered): MixDiff's real branch (blur on every view) and synthetic
branch (solarisation), DINO + MixDiff multi-crop (2 globals at R, 8 locals at 3/7 R; every crop counts as
a view), and the resize-only no-augmentation ablation. Sources are R x R uint8 images, as the ring holds
them. Rates are views per second over the median of --repeats timed calls after one warm-up call;
outputs are in --dtype (default float32, the dtype training's views have on every backend). On the
CPU torch runs one thread (per-core rates).
The CPU targets compare what `auto` runs (torch, or compiled at 224 px) with torchvision.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import os
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import BenchParser, int_list, output_path, save_results, setup_torch, target
from machine import LoadWatch, device_name
from plots import import_pyplot, save_figure
from report import load_line, targets_block
from timing import Timer
from tqdm.auto import tqdm

from onlinemix.views.buffers import RecycledTensors
from onlinemix.views.compiled import COMPILE_MIN_SIZE, warm_up
from onlinemix.views.params import ViewParams, view_generator
from onlinemix.views.recipes import augment_batch, build_transform, multicrop_sizes
from onlinemix.views.specs import ViewSpec, mixdiff_dino_specs, pair_specs, sample_specs
from onlinemix.views.torch_backend import augment_views

DEFAULTS = {  # (default run, --quick run)
    "resolutions": ("32,224", "32"),
    "batches": ("64,256", "8"),
    "repeats": (3, 1),
    "torchvision_images": (32, 4),
    "torchvision_seconds": (2.0, 0.2),
}
BACKENDS = ("torchvision", "torch", "compiled", "triton")
CPU_SPEEDUP = 3.0        # auto's backend >= this x torchvision per image, MixDiff recipes at 224, one core
GPU_SPEEDUP = 3.0        # triton >= this x the torch backend on the same GPU
GPU_VIEWS_S = 150_000    # triton views/s at 224 on the MixDiff recipes
TARGET_RESOLUTION = 224
MIXDIFF = ("mixdiff_real", "mixdiff_synthetic")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def recipe_specs(name: str, resolution: int) -> tuple[ViewSpec, ...]:
    """The views one source image (pair) gets under the named benchmark recipe."""
    if name == "mixdiff_real":
        return pair_specs("simclr", resolution, min_scale=None)[:1]
    if name == "mixdiff_synthetic":
        return pair_specs("simclr", resolution, min_scale=None)[1:]
    if name == "dino_multicrop":
        return mixdiff_dino_specs(*multicrop_sizes(resolution))
    return pair_specs("no_augmentation", resolution)[:1]


RECIPES = ("mixdiff_real", "mixdiff_synthetic", "dino_multicrop", "no_augmentation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/augment.py",
        description="Views/s of torchvision per image, the batched torch backend and the Triton kernels, per "
                    "recipe, resolution and batch.",
        epilog="Flags left out take the default run's value, or the --quick value with --quick. Results: a "
               "table on stdout, JSON at --out, a PNG next to it.",
        defaults=DEFAULTS, quick_help="32 px, batch 8, one repeat: seconds")
    q = p.default_note
    p.add_argument("--resolutions", default=None, help=f"comma-separated output sides R {q('resolutions')}")
    p.add_argument("--batches", default=None, help=f"comma-separated batch sizes {q('batches')}")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {RECIPES}")
    p.add_argument("--repeats", type=int, default=None, help=f"timed calls per measurement {q('repeats')}")
    p.add_argument("--torchvision-images", type=int, default=None,
                   help=f"fewest images per timed torchvision call {q('torchvision_images')}")
    p.add_argument("--torchvision-seconds", type=float, default=None,
                   help=f"longest timed torchvision call, seconds, above the fewest images "
                        f"{q('torchvision_seconds')}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="output dtype of the torch, compiled and Triton backends (default fp32: what training's "
                        "views are; torchvision per image always gives fp32)")
    p.add_torch_flags("They run the torch backend; torchvision per image always runs on the CPU.")
    args = p.parse(argv)
    args.resolutions = int_list(p, "--resolutions", args.resolutions)
    args.batches = int_list(p, "--batches", args.batches)
    args.recipes = [r for r in args.recipes.split(",") if r]
    if unknown := set(args.recipes) - set(RECIPES):
        p.error(f"unknown recipes {sorted(unknown)}; known: {RECIPES}")
    if min(args.resolutions) < 8 or args.repeats < 1 or args.torchvision_images < 1 or args.torchvision_seconds <= 0:
        p.error("--resolutions must be >= 8, --repeats and --torchvision-images >= 1, --torchvision-seconds > 0")
    return args


def smooth_images(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """uint8 sources with image-like structure (gradients plus noise), not pure noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, resolution).expand(resolution, resolution) * torch.rand(batch, 3, 1, 1, generator=g)
    noise = torch.randint(-30, 31, (batch, 3, resolution, resolution), generator=g)
    return (ramp + noise).clamp(0, 255).to(torch.uint8)


def views_per_second(run: Callable[[], int], device: torch.device, repeats: int) -> float:
    """Views / median seconds of `repeats` calls of run() (which returns its view count), after a warm-up."""
    run()
    times, views = [], 0
    for _ in range(repeats):
        with Timer(device) as t:
            views = run()
        times.append(t.seconds)
    return views / statistics.median(times)


def torchvision_run(specs: tuple[ViewSpec, ...], sources: dict[str, torch.Tensor], fewest: int,
                    seconds: float) -> Callable[[], int]:
    """One v2 call per image over all the sources, or over as many as `seconds` allows (at least `fewest`)."""
    transforms = [build_transform(s.recipe, s.size) for s in specs]

    def run_on(count: int) -> int:
        return sum(len(augment_batch(t, sources[s.source][:count])) for t, s in zip(transforms, specs))

    batch = len(next(iter(sources.values())))
    with Timer(torch.device("cpu")) as probe:
        run_on(min(batch, fewest))
    count = max(min(batch, fewest), min(batch, int(seconds / (probe.seconds / min(batch, fewest)))))
    return lambda: run_on(count)


def batched_run(specs: tuple[ViewSpec, ...], sources: dict[str, torch.Tensor], augment: Callable,
                dtype: torch.dtype) -> Callable[[], int]:
    """Draw every spec's parameters for the batch (a new step each call) and run `augment` on each."""
    batch, _, height, width = next(iter(sources.values())).shape
    step = iter(range(1 << 30))

    def run() -> int:
        params = sample_specs(specs, batch, height, width, view_generator(0, 0, next(step)))
        return sum(len(augment(sources[s.source], p, dtype)) for s, p in zip(specs, params))
    return run


def recycling(augment: Callable, device: torch.device) -> Callable:
    """`augment_views` (or a partial of it) writing into recycled output batches on the CPU."""
    if device.type != "cpu":
        return augment
    outputs = RecycledTensors()

    def run(images: torch.Tensor, params: ViewParams, dtype: torch.dtype) -> torch.Tensor:
        return augment(images, params, dtype, out=outputs.empty((params.batch, 3, params.size, params.size), dtype))
    return run


def triton_backend() -> Callable | None:
    """augment_views_triton where CUDA is available (the kernels need a GPU to be timed), else None."""
    if not torch.cuda.is_available():
        return None
    from onlinemix_kernels.augment import augment_views_triton
    return augment_views_triton


def compiled_backend(device: torch.device, quick: bool) -> tuple[Callable | None, str]:
    """augment_views with compiled hue, after compiling it, on the CPU (not with --quick); and what happened."""
    if device.type != "cpu" or quick:
        return None, "not measured (CPU only, and not with --quick)"
    try:
        seconds = warm_up()
    except RuntimeError as e:
        return None, str(e)
    return recycling(partial(augment_views, compiled=True), device), f"compiled in {seconds:.1f}s"


def auto_backend(resolution: int, rates: dict[str, float | None]) -> str:
    """What train.augment_backend=auto runs on the CPU for views of this size, when it could be measured."""
    return "compiled" if resolution >= COMPILE_MIN_SIZE and rates["compiled"] is not None else "torch"


def measure(args: argparse.Namespace, device: torch.device, compiled: Callable | None) -> list[dict]:
    triton = triton_backend()
    dtype = DTYPES[args.dtype]
    rows = []
    bar = tqdm(total=len(args.resolutions) * len(args.batches) * len(args.recipes), dynamic_ncols=True)
    for resolution in args.resolutions:
        for batch in args.batches:
            cpu_sources = {b: smooth_images(batch, resolution, seed=i) for i, b in enumerate(("real", "synthetic"))}
            dev_sources = {b: x.to(device) for b, x in cpu_sources.items()}
            for recipe in args.recipes:
                specs = recipe_specs(recipe, resolution)
                baseline = torchvision_run(specs, cpu_sources, args.torchvision_images, args.torchvision_seconds)
                rates = {"torchvision": views_per_second(baseline, torch.device("cpu"), args.repeats),
                         "torch": views_per_second(batched_run(specs, dev_sources, recycling(augment_views, device),
                                                               dtype), device, args.repeats),
                         "compiled": None if compiled is None else views_per_second(
                             batched_run(specs, dev_sources, compiled, dtype), device, args.repeats),
                         "triton": None if triton is None else views_per_second(
                             batched_run(specs, {b: x.to("cuda") for b, x in cpu_sources.items()}, triton,
                                         dtype), torch.device("cuda"), args.repeats)}
                auto = auto_backend(resolution, rates)
                rows.append({"recipe": recipe, "resolution": resolution, "batch": batch,
                             "views_per_image": len(specs), "views_s": rates, "auto": auto,
                             "torch_over_torchvision": rates["torch"] / rates["torchvision"],
                             "auto_over_torchvision": rates[auto] / rates["torchvision"],
                             "triton_over_torch": (None if rates["triton"] is None
                                                   else rates["triton"] / rates["torch"])})
                bar.update()
    bar.close()
    return rows


def targets(rows: list[dict], device: torch.device) -> list[dict]:
    """The issue's targets, each PASS, MISS or not measured here (CPU targets off the CPU, GPU ones without CUDA,
    and the 224 px ones when 224 px was not measured)."""
    at_target = [r for r in rows if r["resolution"] == TARGET_RESOLUTION]
    mixdiff = [r for r in at_target if r["recipe"] in MIXDIFF]
    mixdiff_gpu = [r for r in mixdiff if r["views_s"]["triton"] is not None]
    on_cpu = device.type == "cpu"
    return [
        target(f"CPU, one core: auto's backend >= {CPU_SPEEDUP:g}x torchvision per image, MixDiff recipes at "
               f"{TARGET_RESOLUTION} (worst)", min((r["auto_over_torchvision"] for r in mixdiff), default=None),
               CPU_SPEEDUP, measured=on_cpu),
        target("CPU, one core: auto's backend not slower than torchvision on any measured recipe (worst)",
               min(r["auto_over_torchvision"] for r in rows), 1.0, measured=on_cpu),
        target(f"GPU: triton >= {GPU_SPEEDUP:g}x the torch backend at {TARGET_RESOLUTION}, MixDiff recipes (worst)",
               min((r["triton_over_torch"] for r in mixdiff_gpu), default=None), GPU_SPEEDUP),
        target(f"GPU: triton views/s at {TARGET_RESOLUTION}, MixDiff recipes (worst)",
               min((r["views_s"]["triton"] for r in mixdiff_gpu), default=None), GPU_VIEWS_S),
    ]


def format_row(r: dict) -> str:
    rates = "  ".join(f"{b} " + ("       n/a" if r["views_s"][b] is None else f"{r['views_s'][b]:10.0f}")
                      for b in BACKENDS)
    return (f"{r['recipe']:18s} R={r['resolution']:<4d} B={r['batch']:<4d} views/s: {rates}"
            f"   torch/torchvision {r['torch_over_torchvision']:5.2f}x  auto ({r['auto']})/torchvision "
            f"{r['auto_over_torchvision']:5.2f}x")


def format_report(res: dict) -> str:
    m = res["meta"]
    lines = [f"device      {m['device_name']} ({m['device']}, {m['threads']} torch threads), {m['date']}",
             f"dtype       {res['config']['dtype']} views from the torch, compiled and Triton backends",
             load_line(m), ""]
    lines += [format_row(r) for r in res["rows"]]
    lines.append(f"compiled    {m['compiled']}")
    if res["meta"]["device"] == "cpu" or not torch.cuda.is_available():
        lines.append("triton      not measured here (needs CUDA)")
    lines += targets_block(res["targets"])
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/augment.py")
    keys = sorted({(r["resolution"], r["batch"]) for r in res["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, (resolution, batch) in zip(axes[0], keys, strict=True):
        rows = [r for r in res["rows"] if (r["resolution"], r["batch"]) == (resolution, batch)]
        for i, backend in enumerate(BACKENDS):
            values = [r["views_s"][backend] or 0 for r in rows]
            ax.bar([j + 0.2 * (i - 1.5) for j in range(len(rows))], values, width=0.2, label=backend)
        ax.set_xticks(range(len(rows)), [r["recipe"].replace("_", "\n", 1) for r in rows], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("views / s")
        ax.set_title(f"R = {resolution}, B = {batch}")
        ax.legend(fontsize=8)
    fig.suptitle(f"view augmentation on {res['meta']['device_name']}", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = setup_torch(args.device, args.threads)
    args.out = output_path(args.out, "bench/augment.py", device.type)
    started = time.perf_counter()
    load = LoadWatch()
    compiled, compiled_status = compiled_backend(device, args.quick)
    rows = measure(args, device, compiled)
    res = {
        "meta": {"device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
                 "threads": torch.get_num_threads(), "torch": torch.__version__, "compiled": compiled_status,
                 **load.meta(args.quick, "bench/augment.py", argv)},
        "config": {"resolutions": args.resolutions, "batches": args.batches, "recipes": args.recipes,
                   "dtype": args.dtype,
                   "repeats": args.repeats, "torchvision_images": args.torchvision_images,
                   "torchvision_seconds": args.torchvision_seconds},
        "rows": rows,
        "targets": targets(rows, device),
    }
    save_results(res, args.out, plot, format_report, _T0, started)
    return res


if __name__ == "__main__":
    main()
