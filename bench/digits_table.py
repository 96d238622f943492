"""A miniature of the MixDiff paper's Table 1 on the bundled digits: SimCLR, BarlowTwins and DINO, each
trained on real pairs, on synthetic pairs only and with MixDiff, with digits-tiny as the generator.

    python bench/digits_table.py                  # the nine configs/experiments/digits-*.yaml, seed 0
    python bench/digits_table.py --seeds 0 1 2    # mean and spread over seeds
    python bench/digits_table.py --quick          # 1 epoch each: checks the script, not the methods

Each run is ``python -m onlinemix.train --config <experiment>`` in its own process (the default run's
model, data and probe; --epochs overrides the configs' train.epochs), with a disk cache of its own. The
score is the end-of-run linear probe's top-1 on the held-out real digits, next to the same probe on the
backbone at its random initialisation. Results: a Markdown table and JSON at --out, and a bar plot next to them.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, BenchParser, output_path, save_results
from machine import LoadWatch, cpu_meta
from plots import import_pyplot, save_figure
from report import load_line
from tqdm.auto import tqdm

from onlinemix.core.config import DataConfig
from onlinemix.data import load_real_images

METHODS = ("simclr", "barlowtwins", "dino")
PAIRINGS = ("real", "synthetic", "mixdiff")
DEFAULTS = {"epochs": (10, 1)}


def parse_args(argv: list[str] | None):
    p = BenchParser("bench/digits_table.py", description=__doc__.split("\n\n")[0],
                    epilog="Flags left out take the default run's value, or the --quick value with --quick.",
                    defaults=DEFAULTS, quick_help="one epoch per run")
    p.add_argument("--epochs", type=int, default=None, help=f"train.epochs of every run {p.default_note('epochs')}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each repeat (default 0)")
    p.add_argument("--runs-dir", type=Path, default=None, help="keep the run directories here (default: removed)")
    args = p.parse(argv)
    p.require_at_least(args, 1, "epochs")
    return args


def train_once(config: Path, epochs: int, seed: int, runs: Path, *flags: str) -> dict[str, Any]:
    """One run (with ``flags`` added to its command); its probe results and wall time. A failed run stops the
    table with the run's own error."""
    name = f"{config.stem}-seed{seed}"
    command = [sys.executable, "-m", "onlinemix.train", "--config", str(config), "--train.epochs", str(epochs),
               "--train.seed", str(seed), "--output-dir", str(runs), "--run-name", name, *flags]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    probe = json.loads((runs / name / "probe.json").read_text())
    return {"seed": seed, "seconds": time.perf_counter() - start, "top1": probe["trained"]["top1"],
            "random_init_top1": probe["random_init"]["top1"]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    scores = [r["top1"] for r in runs]
    return {"top1_mean": statistics.fmean(scores), "top1_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "random_init_top1": statistics.fmean(r["random_init_top1"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs), "runs": runs}


def markdown(res: dict[str, Any]) -> str:
    spread = len(res["config"]["seeds"]) > 1
    cell = (lambda c: f"{c['top1_mean']:.2f} ± {c['top1_std']:.2f}") if spread else (lambda c: f"{c['top1_mean']:.2f}")
    lines = ["| method | real | synthetic | MixDiff | random init |", "|---|---:|---:|---:|---:|"]
    for method in METHODS:
        cells = res["table"][method]
        lines.append(f"| {method} | " + " | ".join(cell(cells[p]) for p in PAIRINGS)
                     + f" | {cells['real']['random_init_top1']:.2f} |")
    c = res["config"]
    lines.append(f"\nLinear-probe top-1 (%) on the {c['heldout']} held-out real digits; {c['epochs']} epochs, "
                 f"seeds {', '.join(map(str, c['seeds']))}; {res['meta']['total_run_s'] / 60:.1f} min of training "
                 f"on {res['meta']['cpu_count']} cores ({res['meta']['cpu']}).")
    return "\n".join(lines)


def format_report(res: dict[str, Any]) -> str:
    return markdown(res) + "\n" + load_line(res["meta"])


def plot(res: dict[str, Any], path: Path) -> None:
    plt = import_pyplot("bench/digits_table.py")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.25
    for i, pairing in enumerate(PAIRINGS):
        cells = [res["table"][m][pairing] for m in METHODS]
        ax.bar([j + (i - 1) * width for j in range(len(METHODS))], [c["top1_mean"] for c in cells], width,
               yerr=[c["top1_std"] for c in cells], label=pairing)
    init = statistics.fmean(res["table"][m]["real"]["random_init_top1"] for m in METHODS)
    ax.axhline(init, ls="--", c="grey", label="random init")
    ax.set_xticks(range(len(METHODS)), METHODS)
    low = min(init, *(res["table"][m][p]["top1_mean"] for m in METHODS for p in PAIRINGS))
    ax.set(ylabel="linear probe top-1 (%)", ylim=(max(0, low - 5), 100),
           title=f"digits, {res['config']['epochs']} epochs, generator digits-tiny")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    out = output_path(args.out, "bench/digits_table.py")
    load = LoadWatch()
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix=".digits-table-"))
    table: dict[str, dict[str, Any]] = {}
    cells = [(m, p) for m in METHODS for p in PAIRINGS]
    for method, pairing in tqdm(cells, desc="runs", unit="config", file=sys.stderr):
        config = REPO / "configs" / "experiments" / f"digits-{method}-{pairing}.yaml"
        # A cache of its own per run: sharing one, later cells would serve earlier cells' variations and fall
        # back to real views less, so a cell's synthetic share would depend on the order of the runs.
        runs = [train_once(config, args.epochs, seed, runs_dir, "--cache.dir",
                           str(runs_dir / f"{config.stem}-seed{seed}-cache")) for seed in args.seeds]
        table.setdefault(method, {})[pairing] = summarize(runs)
    if args.runs_dir is None:
        shutil.rmtree(runs_dir, ignore_errors=True)
    res = {"meta": {**cpu_meta(),
                    "total_run_s": sum(c["seconds"] for row in table.values() for c in row.values()),
                    **load.meta(args.quick, "bench/digits_table.py", argv)},
           "config": {"epochs": args.epochs, "seeds": args.seeds, "generator": "digits-tiny",
                      "heldout": len(load_real_images(DataConfig()).holdout_ids)},
           "table": table}
    save_results(res, out, plot, format_report, _T0, started)
    out.with_suffix(".md").write_text(markdown(res) + "\n")
    return res


if __name__ == "__main__":
    main()
