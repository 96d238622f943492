"""Generation speed-ups side by side: how many more images per second each buys, and what it costs.

    python bench/speedups.py            # full-size architecture at 256 and 512 px, then digits-tiny (CPU: ~30 min)
    python bench/speedups.py --quick    # the stub instead of the full size, 64 digits: what the tests run

Every training-free option of ``generator.*`` and the combinations worth having, against the plain
pipeline, in one process, each option on the same weights (``FastUNet`` around one loaded UNet):

* full size: ``generate()`` of ``--batch`` images on the SD image-variation architecture with random weights
  (``generator.model: full-size-random``: the real model's compute, no download) at each of ``--sizes``,
  ``--steps`` steps, guidance 3; options timed in turns, ``--repeats`` times, median. The same model at a
  lower resolution is the last option: the 256 px row against the 512 px one is its speed-up.
* digits-tiny: images/s of ``generate()`` on ``--speed-batch``-image batches in turns, and quality by ``python -m onlinemix
  .tinymodel quality``'s measures on ``--num-images`` held-out digits: class kept (a classifier's accuracy on
  the variations against the source's class), pixel distance from the source, diversity across two seeds.
  The distilled student (``digits-tiny-student``, ``python -m onlinemix.tinymodel distill``) runs against its
  teacher, digits-tiny at 10 steps.

Results: a table, JSON, and a Pareto plot (speed-up on digits-tiny against class kept, one point per option;
beside it the full-size speed-ups per size).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import dataclasses
import statistics
from typing import Any

import torch
from common import BenchParser, int_list, output_path, save_results, setup_torch, target
from machine import LoadWatch, torch_meta
from plots import import_pyplot, save_figure
from report import Column, Table, load_line, targets_block, torch_lines
from timing import in_turns, timed
from tqdm.auto import tqdm

from onlinemix.core.config import DataConfig, GeneratorConfig
from onlinemix.data import load_real_images
from onlinemix.generation.generator import DiffusersVariationGenerator
from onlinemix.generation.speedups import FastUNet, Speedups
from onlinemix.tinymodel.quality import digits_classifier, measure

OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "deep-cache-2": {"deep_cache_interval": 2},
    "deep-cache-3": {"deep_cache_interval": 3},
    "tome-0.5": {"tome_ratio": 0.5},
    "guidance-0.5": {"guidance_fraction": 0.5},
    "deep-cache-3+guidance-0.5": {"deep_cache_interval": 3, "guidance_fraction": 0.5},
    "all-three": {"deep_cache_interval": 3, "guidance_fraction": 0.5, "tome_ratio": 0.5},
}
TOGETHER = "all-three"
STUDENT = "digits-tiny-student"
DEFAULTS = {"sizes": ("256,512", "32"), "steps": (6, 6), "batch": (1, 2), "repeats": (1, 1), "num_images": (359, 64),
            "speed_batch": (64, 16)}
GUIDANCE = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/speedups.py",
        description="Images/s of every training-free generation speed-up (and the distilled student) against the "
                    "plain pipeline, on the full-size architecture and on digits-tiny, with their quality cost.",
        epilog="Results: a table on stdout, JSON at --out, a PNG next to it.", defaults=DEFAULTS,
        quick_help="the stub at 32 px instead of the full size, 64 held-out digits: about a minute")
    p.add_torch_flags("Generation runs in this process.")
    p.add_argument("--sizes", default=None, help=f"full-size resolutions, comma-separated {p.default_note('sizes')}")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps at full size {p.default_note('steps')}")
    p.add_argument("--batch", type=int, default=None, help=f"images per full-size call {p.default_note('batch')}")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"full-size turns over the options (median) {p.default_note('repeats')}")
    p.add_argument("--num-images", type=int, default=None,
                   help=f"held-out digits for quality {p.default_note('num_images')}")
    p.add_argument("--speed-batch", type=int, default=None,
                   help=f"digits per call when timing digits-tiny {p.default_note('speed_batch')}")
    args = p.parse(argv)
    args.sizes = int_list(p, "--sizes", args.sizes)
    p.require_at_least(args, 1, "steps", "batch", "repeats", "speed_batch")
    p.require_at_least(args, 2, "num_images")
    return args


def options_on(base: GeneratorConfig) -> dict[str, GeneratorConfig]:
    return {name: dataclasses.replace(base, **opts) for name, opts in OPTIONS.items()}


def rates_on_one_unet(gen: DiffusersVariationGenerator, configs: dict[str, GeneratorConfig], images: torch.Tensor,
                      repeats: int, desc: str) -> dict[str, float]:
    """Images/s of ``gen.generate`` under each config's speed-ups, on ``gen``'s own weights, timed in turns."""
    plain_unet = gen.pipe.unet

    def call(cfg: GeneratorConfig):
        def run() -> float:
            speedups = Speedups.from_config(cfg)
            gen.cfg = cfg
            gen.pipe.unet = FastUNet(plain_unet, speedups) if speedups.active else plain_unet
            try:
                return timed(lambda: gen.generate(images, list(range(len(images)))))()
            finally:
                if isinstance(gen.pipe.unet, FastUNet):
                    gen.pipe.unet = gen.pipe.unet.unwrap()
        return run

    bar = tqdm(total=repeats, desc=desc, unit="turn", leave=False)
    times = in_turns(tuple(call(cfg) for cfg in configs.values()), repeats, bar.update)
    bar.close()
    return {name: len(images) / statistics.median(t) for name, t in zip(configs, times, strict=True)}


def full_size(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Per size, images/s of each option on the full-size architecture (the stub with --quick)."""
    model = "stub" if args.quick else "full-size-random"
    out = {}
    for size in args.sizes:
        base = GeneratorConfig(model=model, steps=args.steps, guidance=GUIDANCE, resolution=size)
        gen = DiffusersVariationGenerator(base, device, size)
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        gen.generate(images[:1], [0])  # warm-up: allocations, first-call set-up
        out[str(size)] = rates_on_one_unet(gen, options_on(base), images, args.repeats, f"{model} {size} px")
        del gen
    return out


def digits_tiny(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Per option (and the student): images/s on digits-tiny and the quality of its variations."""
    base = GeneratorConfig(guidance=GUIDANCE)
    configs = {**options_on(base), STUDENT: dataclasses.replace(base, model=STUDENT)}
    real = load_real_images(DataConfig())
    images = real.images[real.holdout_ids[:args.speed_batch]]
    gens = {}
    for name, cfg in configs.items():
        gens[name] = DiffusersVariationGenerator(cfg, device, images.shape[-1])
        gens[name].generate(images[:2], [0, 1])  # warm-up
    speed = dict(zip(gens, in_turns(tuple(timed(lambda g=g: g.generate(images, list(range(len(images)))))
                                          for g in gens.values()), 3), strict=True))
    out, classifier = {}, digits_classifier()
    for name, cfg in tqdm(configs.items(), desc="digits-tiny quality", unit="option", leave=False):
        q = measure(cfg, [GUIDANCE], args.num_images, classifier=classifier)
        out[name] = {"img_s": len(images) / statistics.median(speed[name]),
                     "class_kept": q["scales"][0]["accuracy"], "pixel": q["scales"][0]["pixel"],
                     "seed_diversity": q["seeds"]["feature"], "frechet": q["scales"][0]["frechet_distance"],
                     "steps": gens[name].cfg.steps, "guided": gens[name].cfg.guidance > 1}
    return out


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    tiny, sizes = res["digits_tiny"], res["full_size"]
    plain = tiny["plain"]
    at_256 = sizes.get("256")
    together = None if at_256 is None else at_256[TOGETHER] / at_256["plain"]
    student = tiny[STUDENT]
    return [
        target(f"training-free options together ({TOGETHER}): full-size images/s at 256 px vs plain", together, 2.0,
               measured=at_256 is not None and not res["meta"]["quick"]),
        target(f"{TOGETHER}: class kept on digits-tiny lost (points)",
               100 * (plain["class_kept"] - tiny[TOGETHER]["class_kept"]), 3.0, "<="),
        target("distilled student: digits-tiny images/s vs the 10-step teacher", student["img_s"] / plain["img_s"],
               5.0),
        target("distilled student: class kept lost (points)", 100 * (plain["class_kept"] - student["class_kept"]),
               5.0, "<="),
    ]


def report(res: dict[str, Any]) -> str:
    m, tiny, sizes = res["meta"], res["digits_tiny"], res["full_size"]
    plain = tiny["plain"]
    lines = ["Generation speed-ups", *torch_lines(m), load_line(m), "",
             f"full size ({m['full_model']}, {m['steps']} steps, guidance {GUIDANCE:g}, batch {m['batch']}): "
             "images/s and x plain, per size"]
    table = Table(Column("option", 26, lambda r: r[0], "<"),
                  *(Column(f"{s} px", 17, lambda r, s=s: f"{sizes[s][r[0]]:.4f} x{sizes[s][r[0]] / sizes[s]['plain']:.2f}")
                    for s in sizes))
    lines += [table.header(), *(table.row((name,)) for name in OPTIONS)]
    if "256" in sizes and "512" in sizes:
        lines.append(f"  lower resolution: plain at 256 px is x{sizes['256']['plain'] / sizes['512']['plain']:.2f} "
                     "the images/s at 512 px")
    lines += ["", f"digits-tiny ({m['num_images']} held-out digits; plain = 10 steps, guidance {GUIDANCE:g})"]
    table = Table(Column("option", 26, lambda r: r[0], "<"), Column("steps", 5, lambda r: str(r[1]["steps"])),
                  Column("img/s", 8, lambda r: f"{r[1]['img_s']:.1f}"),
                  Column("x plain", 7, lambda r: f"{r[1]['img_s'] / plain['img_s']:.2f}"),
                  Column("class kept", 10, lambda r: f"{r[1]['class_kept']:.1%}"),
                  Column("pixel", 6, lambda r: f"{r[1]['pixel']:.3f}"),
                  Column("seed div", 8, lambda r: f"{r[1]['seed_diversity']:.3f}"),
                  Column("Frechet", 7, lambda r: f"{r[1]['frechet']:.2f}"))
    lines += [table.header(), *(table.row(item) for item in tiny.items())]
    return "\n".join(lines + targets_block(res["targets"]))


def plot(res: dict[str, Any], png) -> None:
    plt = import_pyplot("bench/speedups.py")
    tiny, sizes = res["digits_tiny"], res["full_size"]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    plain = tiny["plain"]
    for name, row in tiny.items():
        x, y = 100 * row["class_kept"], row["img_s"] / plain["img_s"]
        ax.scatter(x, y, marker="*" if name == STUDENT else "o", s=80 if name == STUDENT else 40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(1, color="grey", lw=0.5)
    ax.set(xlabel="class kept on held-out digits (%)", ylabel="images/s vs plain digits-tiny",
           title="digits-tiny: speed-up against quality")
    names = [n for n in OPTIONS if n != "plain"]
    width = 0.8 / max(1, len(sizes))
    for i, (size, rates) in enumerate(sizes.items()):
        bars.bar([j + i * width for j in range(len(names))], [rates[n] / rates["plain"] for n in names], width,
                 label=f"{size} px")
    bars.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right",
                    fontsize=8)
    bars.axhline(1, color="grey", lw=0.5)
    bars.set(ylabel="images/s vs plain", title=f"{res['meta']['full_model']}: speed-up per option")
    bars.legend()
    fig.tight_layout()
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = setup_torch(args.device, args.threads)
    out = output_path(args.out, "bench/speedups.py", device.type)
    watch = LoadWatch()
    started = time.perf_counter()
    res: dict[str, Any] = {"full_size": full_size(args, device), "digits_tiny": digits_tiny(args, device)}
    res["meta"] = {**torch_meta(device, args.threads is None), **watch.meta(args.quick, "bench/speedups.py", argv),
                   "full_model": "stub" if args.quick else "full-size-random", "steps": args.steps,
                   "batch": args.batch, "num_images": args.num_images}
    res["targets"] = targets(res)
    save_results(res, out, plot, report, _T0, started, gap=True, after_imports=True)
    return res


if __name__ == "__main__":
    main()
