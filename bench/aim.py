"""Generation aimed by the trainers, at one generation budget: which images get the scarce variations
(generator.aim), how different they are (generator.strength adaptive) and how much each pair counts
(train.pair_weighting), against plain real pairs, the paper's precompute and online generation in the
trainers' order, on the bundled digits with digits-tiny.

    python bench/aim.py                                   # 7 settings x seeds 0-4, the default epochs
    python bench/aim.py --settings real uniform stale     # a subset
    python bench/aim.py --method barlowtwins --epochs 6
    python bench/aim.py --quick                           # 1 epoch, 2 seeds: checks the script, not the settings

Every setting gets the same budget: as many generated pairs as there are training images (1,438).
``precompute`` warms one variation per image into a fresh cache (``python -m onlinemix.cache warm
--variations 1``, one worker, timed with the run) and trains offline from it; the online settings run their
producer held to ``producer.max_pairs_per_epoch = ceil(budget / epochs)``, each with a fresh cache
directory. Each run is ``python -m onlinemix.train`` in its own process (digits_table's ``train_once``), with
``generator.seed`` = ``train.seed``, scored by the end-of-run linear probe and the last epoch's kNN top-1 on
the held-out real digits.

Results: a Markdown table printed and written next to the JSON at --out, and a PNG. Per setting: mean and
95% Student t interval over seeds, the paired difference to ``uniform`` (same seeds), the pairs generated
as each run counts them and the distinct images in its cache, the second views by origin, wall and CPU
seconds per run (CPU seconds change less with other load). A WARNING names online settings whose runs
left the budget unspent, and whether their producers fell behind the cap or stopped generating; the
settings are then not compared at one budget. The default 6 epochs keep the cap (240 pairs per epoch)
within one CPU producer's reach and the full run (7 settings x 5 seeds) at an estimated 40 minutes on 2 idle
cores (one seed of the seven took 20 minutes and 611 CPU seconds pinned to one core shared with other work).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from aimbench.report import BASELINE, format_report, markdown, plot, summarize
from aimbench.runs import make_settings, missing_flags, per_epoch_cap, run_once, train_help
from common import BenchParser, output_path, save_results
from machine import LoadWatch, cpu_meta
from tqdm.auto import tqdm

from onlinemix.core.config import DataConfig
from onlinemix.data import load_real_images

METHODS = ("simclr", "barlowtwins", "dino")
DEFAULTS = {"epochs": (6, 1), "seeds": ([0, 1, 2, 3, 4], [0, 1])}


def parse_args(argv: list[str] | None):
    names = list(make_settings(0.0, 0.3))
    p = BenchParser("bench/aim.py", description=__doc__.split("\n\n")[0],
                    epilog="settings: " + "; ".join(f"{s.name}: {s.about}" for s in make_settings(0.0, 0.3).values())
                           + ". Flags left out take the default run's value, or the --quick value with --quick.",
                    defaults=DEFAULTS, quick_help="one epoch, seeds 0 1: checks the script only")
    p.add_argument("--settings", nargs="+", choices=names, default=names, metavar="NAME",
                   help=f"settings to run, in the table's order (default all: {' '.join(names)})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train.seed (and generator.seed) of each repeat (default 0 1 2 3 4 / quick 0 1)")
    p.add_argument("--epochs", type=int, default=None, help=f"train.epochs of every run {p.default_note('epochs')}")
    p.add_argument("--method", choices=METHODS, default="simclr", help="train.method (default simclr)")
    p.add_argument("--noise-min", type=float, default=0.0, help="adaptive: generator.noise_min (default 0)")
    p.add_argument("--noise-max", type=float, default=0.3, help="adaptive: generator.noise_max (default 0.3)")
    p.add_argument("--threads", type=int, default=None,
                   help="train.cpu_threads and generator.cpu_threads of every run (default: the config's, "
                        "i.e. the trainer takes the cores the producer leaves)")
    p.add_argument("--cpus", default=None,
                   help="comma-separated CPU ids this script and every run are pinned to (as taskset -c; "
                        "default: not pinned)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="keep the run directories, presets and caches here (default: a temporary one, removed)")
    args = p.parse(argv)
    p.require_at_least(args, 1, "epochs", "threads")
    if not 0 <= args.noise_min <= args.noise_max:
        p.error("--noise-min and --noise-max must satisfy 0 <= min <= max")
    args.settings = [n for n in names if n in args.settings]
    args.seeds = list(dict.fromkeys(args.seeds))
    if args.cpus is not None:
        try:
            os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})  # the runs inherit it
        except (ValueError, OSError) as e:
            p.error(f"--cpus {args.cpus}: {e}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    out = output_path(args.out, "bench/aim.py")
    settings = make_settings(args.noise_min, args.noise_max)
    chosen = [settings[n] for n in args.settings]
    if missing := missing_flags(chosen, train_help()):
        sys.exit("bench/aim.py: python -m onlinemix.train here lacks flags these settings need: "
                 + "; ".join(f"{name}: {' '.join(flags)}" for name, flags in missing.items())
                 + ". Run the others with --settings.")
    real = load_real_images(DataConfig())
    budget = len(real.train_ids)  # precompute's one variation per training image
    cap = per_epoch_cap(budget, args.epochs)
    load = LoadWatch()
    work = args.runs_dir or Path(tempfile.mkdtemp(prefix=".aim-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in chosen}
    cells = [(seed, s) for seed in args.seeds for s in chosen]  # seed by seed: drifting load hits every setting
    try:
        with tqdm(cells, desc="runs", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
            for seed, setting in bar:
                bar.set_postfix_str(f"{setting.name} seed {seed}")
                runs[setting.name].append(run_once(setting, args.method, args.epochs, seed, cap, args.threads, work))
                if args.runs_dir is None:
                    shutil.rmtree(work / f"{setting.name}-seed{seed}-cache", ignore_errors=True)
    finally:
        if args.runs_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    baseline = runs.get(BASELINE)
    summaries = {s.name: summarize(runs[s.name], None if s.name == BASELINE else baseline) for s in chosen}
    res = {"meta": {**cpu_meta(), "total_run_s": sum(r["wall_s"] for rs in runs.values() for r in rs),
                    "cpus": sorted(os.sched_getaffinity(0)), **load.meta(args.quick, "bench/aim.py", argv)},
           "config": {"method": args.method, "epochs": args.epochs, "seeds": args.seeds, "generator": "digits-tiny",
                      "budget": budget, "max_pairs_per_epoch": cap, "noise_min": args.noise_min,
                      "noise_max": args.noise_max, "threads": args.threads, "heldout": len(real.holdout_ids)},
           "settings": {s.name: {"about": s.about, "online": s.online, "summary": summaries[s.name],
                                 "runs": runs[s.name]}
                        for s in chosen},
           "targets": []}
    save_results(res, out, plot, format_report, _T0, started)
    out.with_suffix(".md").write_text(markdown(res) + "\n")
    return res


if __name__ == "__main__":
    main()
