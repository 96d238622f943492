"""Online generation vs the paper's precompute, side by side in one run on the same machine.

    python bench/precompute.py              # digits at 32 px, 25% of the training images, 4 epochs, K = 1, 2
    python bench/precompute.py --quick      # 16 px, 5%, 2 epochs, K = 1: what tests/test_bench_run.py runs
    python bench/precompute.py --variations 1,2,4 --epochs 4

For each K of --variations, with the tiny stub diffuser and the package's defaults otherwise:

* precompute (the paper's way): ``cache warm --variations K`` into an empty cache (``onlinemix.generation.warm.warm``,
  its one CPU worker), then ``--offline`` training from that cache alone for --epochs;
* online: producers and trainer together (one producer, ``--gen-gpus 1``) into an empty cache, with
  ``staleness.max_reuse = epochs / K`` and ``staleness.max_age = epochs``, so that each synthetic view may
  serve as often as a precomputed one does and the number of distinct variations is comparable, and
  ``staleness.policy=wait`` (a batch waits for its views: online generation at its most, time aside).

Both run in this process (``onlinemix.train.run``, as ``python -m onlinemix.train`` does), so interpreter
start-up is left out of both; the warm's worker and the online producer start (spawn) and load the generator
inside the timed span. The batch is the largest divisor of the training-image count up to --batch-size, so
every image is served once per epoch.

Counted per run, from its metrics.jsonl (every epoch's row) and the cache index afterwards:

* wall time: warm + offline training, or the online run;
* distinct variations per image trained on: the second views that were a variation's first serving, / images.
  Online, the ``fresh`` views (a ring view serving for the first time: a new variation); an older variation
  from the disk cache counts as a reuse, so online counts are lower bounds. Offline, where every image is
  served once per epoch and the cache serves its least-used variation, an epoch's servings all have the
  same prior-use count, ``mean_reuse``: the epochs with 0 are first servings;
* fresh fraction: those first servings / all second views (fallbacks to a real view included);
* generated per image: variations in the cache index afterwards / images (online: what the producer made,
  served or not).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import tempfile
from pathlib import Path

import torch
from common import BenchParser, int_list, output_path, run_metrics, save_results, scratch_dir
from machine import LoadWatch, cpu_meta
from plots import import_pyplot, save_figure
from report import load_line, machine_line

from onlinemix.cache import CacheReader, cache_keys
from onlinemix.core.config import load_config
from onlinemix.data import load_real_images, select_train_ids
from onlinemix.generation.warm import warm
from onlinemix.train import run as train_run

DEFAULTS = {  # (default run, --quick run)
    "variations": ("1,2", "1"),
    "epochs": (4, 2),
    "resolution": (32, 16),
    "real_fraction": (0.25, 0.05),
    "batch_size": (64, 48),
}
WAYS = ("precompute", "online")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/precompute.py",
        description="cache warm + offline training (the paper's precompute) vs online producers, for K variations "
                    "per image: wall time, distinct variations per image trained on, fresh fraction.",
        epilog="Flags left out take the default run's value, or the --quick value with --quick. Results: a table on "
               "stdout, JSON at --out and a Pareto plot (wall time vs distinct variations per image) next to it.",
        defaults=DEFAULTS, quick_help="16 px, 5%% of the images, 2 epochs, K = 1: under a minute")
    q = p.default_note
    p.add_argument("--variations", default=None,
                   help=f"comma-separated K, variations per image warmed; each must divide --epochs {q('variations')}")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs of every run {q('epochs')}")
    p.add_argument("--resolution", type=int, default=None, help=f"data.resolution {q('resolution')}")
    p.add_argument("--real-fraction", type=float, default=None,
                   help=f"data.real_fraction: the share of the digits' training images used {q('real_fraction')}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"largest train.batch_size; the largest divisor of the image count up to it is used "
                        f"{q('batch_size')}")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the runs and caches go (removed afterwards; default the system's temporary directory)")
    args = p.parse(argv)
    args.variations = int_list(p, "--variations", args.variations)
    p.require_at_least(args, 1, "epochs")
    p.require_at_least(args, 2, "batch_size")
    if bad := [k for k in args.variations if args.epochs % k]:
        p.error(f"--variations {','.join(map(str, bad))} must divide --epochs {args.epochs}: the matching online run "
                f"serves each view epochs / K times")
    p.require_fraction(args, "real_fraction")
    return args


# ----------------------------------------------------------------------------- runs

def overrides(args: argparse.Namespace, cache_dir: Path, batch_size: int) -> dict[str, str]:
    """The config every run of this benchmark shares (the package's defaults otherwise)."""
    return {"data.resolution": str(args.resolution), "data.real_fraction": str(args.real_fraction),
            "cache.dir": str(cache_dir), "train.batch_size": str(batch_size), "train.epochs": str(args.epochs),
            "probe.enabled": "false", "probe.knn_every": "0"}


def flags(values: dict[str, str]) -> list[str]:
    """Training command-line flags for dotted config keys."""
    return [arg for key, value in values.items() for arg in (f"--{key.replace('_', '-')}", value)]


def train_images(args: argparse.Namespace) -> int:
    cfg = load_config(None, {"data.resolution": str(args.resolution), "data.real_fraction": str(args.real_fraction)})
    return len(select_train_ids(load_real_images(cfg.data), cfg.data))


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def cache_variations(cache_dir: Path, resolution: int) -> int:
    """Variations in the cache's index (its one key)."""
    (key,) = cache_keys(cache_dir)
    return len(CacheReader(cache_dir, key, resolution, verify=False))


def served(run_dir: Path, offline: bool) -> dict:
    """Second views by origin over the run's epochs, and the first servings among them (see the module doc)."""
    epochs = [row for row in run_metrics(run_dir) if "epoch_end" in row]
    counts = {k: sum(row[k] for row in epochs) for k in ("fresh", "cached", "disk", "fallback")}
    first = (sum(row["disk"] for row in epochs if row["mean_reuse"] == 0) if offline else counts["fresh"])
    return {**counts, "first_servings": first, "second_views": sum(counts.values()), "epochs": len(epochs)}


def timed_train(argv: list[str]) -> float:
    started = time.perf_counter()
    train_run(argv)
    return time.perf_counter() - started


def run_precompute(args: argparse.Namespace, work: Path, k: int, batch_size: int) -> dict:
    """``cache warm --variations k``, then offline training from that cache."""
    cache_dir, name = work / f"precompute-{k}" / "cache", f"precompute-{k}"
    values = overrides(args, cache_dir, batch_size)
    started = time.perf_counter()
    result = warm(load_config(None, values), k, workers=1)
    warm_s = time.perf_counter() - started
    if result.interrupted:
        raise result.interrupted
    train_s = timed_train([*flags(values), "--offline", "--gen-gpus", "0", "--output-dir", str(work),
                           "--run-name", name])
    return {"way": "precompute", "k": k, "setting": f"K={k}", "warm_s": warm_s, "train_s": train_s,
            "wall_s": warm_s + train_s, "warm_generated": result.generated,
            "cache_variations": cache_variations(cache_dir, args.resolution), **served(work / name, offline=True)}


def run_online(args: argparse.Namespace, work: Path, k: int, batch_size: int) -> dict:
    """Producers and trainer together, each view serving up to epochs / k times; batches wait for their views
    (policy ``wait``), so that online generation makes what it can before the trainer passes it."""
    cache_dir, name, reuse = work / f"online-{k}" / "cache", f"online-{k}", args.epochs // k
    train_s = timed_train([*flags({**overrides(args, cache_dir, batch_size), "staleness.max_reuse": str(reuse),
                                   "staleness.max_age": str(args.epochs), "staleness.policy": "wait"}),
                           "--output-dir", str(work), "--run-name", name])
    return {"way": "online", "k": k, "setting": f"max_reuse={reuse}", "warm_s": 0.0, "train_s": train_s,
            "wall_s": train_s, "cache_variations": cache_variations(cache_dir, args.resolution),
            **served(work / name, offline=False)}


def derive(row: dict, images: int) -> dict:
    """Per-image and fractional figures of one run."""
    return {**row, "distinct_per_image": row["first_servings"] / images,
            "generated_per_image": row["cache_variations"] / images,
            "fresh_fraction": row["first_servings"] / row["second_views"]}


# ----------------------------------------------------------------------------- output

def label(row: dict) -> str:
    return f"{row['way']} {row['setting']}"


def pareto(rows: list[dict]) -> list[str]:
    """The runs no other run beats on both wall time (lower) and distinct variations per image (higher)."""
    point = {label(r): (r["wall_s"], -r["distinct_per_image"]) for r in rows}
    return [name for name, p in point.items()
            if not any(o != p and o[0] <= p[0] and o[1] <= p[1] for o in point.values())]


def format_report(res: dict) -> str:
    m, c = res["meta"], res["config"]
    lines = [machine_line(m), f"date        {m['date']}", load_line(m),
             f"setup       digits at {c['resolution']} px, {c['images']} training images (data.real_fraction "
             f"{c['real_fraction']:g}), batch {c['batch_size']}, {c['epochs']} epochs, stub generator; warm: 1 "
             f"worker; online: 1 producer, max_age {c['epochs']}", "",
             f"  {'way':<11}{'setting':<14}{'wall s':>8}{'warm s':>8}{'train s':>8}{'distinct/img':>13}"
             f"{'generated/img':>14}{'fresh frac':>11}{'fresh':>7}{'cached':>7}{'disk':>7}{'fallback':>9}"]
    for r in res["rows"]:
        lines.append(f"  {r['way']:<11}{r['setting']:<14}{r['wall_s']:>8.1f}{r['warm_s']:>8.1f}{r['train_s']:>8.1f}"
                     f"{r['distinct_per_image']:>13.2f}{r['generated_per_image']:>14.2f}{r['fresh_fraction']:>11.2f}"
                     f"{r['fresh']:>7}{r['cached']:>7}{r['disk']:>7}{r['fallback']:>9}")
    for k in c["variations"]:
        pre, on = (next(r for r in res["rows"] if r["way"] == way and r["k"] == k) for way in WAYS)
        lines.append(f"  K={k}: online / precompute wall time {on['wall_s'] / pre['wall_s']:.2f}x, distinct "
                     f"variations {on['distinct_per_image']:.2f} vs {pre['distinct_per_image']:.2f} per image")
    lines.append("  Pareto front (less wall time, more distinct variations): " + ", ".join(res["pareto"]))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/precompute.py")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for way, marker in zip(WAYS, ("s", "o")):
        rows = [r for r in res["rows"] if r["way"] == way]
        ax.plot([r["wall_s"] for r in rows], [r["distinct_per_image"] for r in rows], marker, ms=8, label=way)
        for r in rows:
            ax.annotate(f" {r['setting']}", (r["wall_s"], r["distinct_per_image"]), fontsize=8)
    front = sorted((r for r in res["rows"] if label(r) in res["pareto"]), key=lambda r: r["wall_s"])
    ax.step([r["wall_s"] for r in front], [r["distinct_per_image"] for r in front], "k--", where="post", lw=0.8,
            label="Pareto front")
    ax.set_xlabel("wall time, s (warm + training, or the online run)")
    ax.set_ylabel("distinct variations per image trained on")
    ax.set_xlim(0, 1.25 * max(r["wall_s"] for r in res["rows"]))  # room for the labels
    ax.set_ylim(0, 1.15 * max(r["distinct_per_image"] for r in res["rows"]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    c = res["config"]
    ax.set_title(f"{c['images']} digits at {c['resolution']} px, {c['epochs']} epochs, {res['meta']['cpu_count']} "
                 f"cores", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = output_path(args.out, "bench/precompute.py")
    images = train_images(args)
    batch_size = largest_divisor(images, args.batch_size)
    load = LoadWatch()
    with scratch_dir(args.dir, ".precompute-bench-") as work:
        rows = [derive(run(args, work, k, batch_size), images)
                for k in args.variations for run in (run_precompute, run_online)]
    res = {
        "meta": {**cpu_meta(), "torch": torch.__version__,
                 **load.meta(args.quick, "bench/precompute.py", argv)},
        "config": {"variations": args.variations, "epochs": args.epochs, "resolution": args.resolution,
                   "real_fraction": args.real_fraction, "images": images, "batch_size": batch_size},
        "rows": rows,
        "pareto": pareto(rows),
        "targets": [],  # none: the trade-off is reported, the choice is the user's
    }
    save_results(res, out, plot, format_report, _T0, started)
    return res


if __name__ == "__main__":
    main()
