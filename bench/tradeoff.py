"""The simulator (onlinemix.tools.simulate) against real online runs: predicted and measured fractions side by side.

    python bench/tradeoff.py              # six short CPU runs, about 12 min on 2 busy cores
    python bench/tradeoff.py --quick      # one run of one epoch on a fifth of the digits: a smoke test
    python bench/tradeoff.py --settings slow-real,wait --epochs 2

Each setting is a real ``python -m onlinemix.train`` run (bundled digits at 16 px, one CPU producer of
the tiny stub, one thread each, a fresh disk cache, metrics every step). From its ``metrics.jsonl``
the script takes the rates the run saw: a producer's pairs/s while generating (``generated`` /
``producer_busy_s``), the trainer's step time without its waits for input (mean of ``step_s`` -
``data_wait_s``) and, where the trainer waited for its input, the input pipeline's own time per batch
(:func:`prepare_s`). It then simulates the same config at those rates and compares, per epoch, the
fresh / cached / disk / fallback fractions of the second views: a point passes when the prediction
is within 15% of the measured fraction, or 0.05 absolute where that is larger (small fractions).
It also reports the two efficiency targets measured in the real runs: generated pairs the ring
evicted before they ever served (<= 5% of those generated) and the trainer's time stalled on data
(<= 1% of wall under the ``real`` and ``cached`` policies; the first step, which waits for the input
pipeline to fill, is start-up and left out).

The ``slow-default`` setting runs where users do: generation hundreds of times slower than training
(a 100-step generator), the default configuration, 10 epochs. It is also trained without generation
(``train.pairing=real``, no producer), and the trainer must keep >= 98% of that speed with generation
at least 100x slower than its training.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, BenchParser, output_path, repo_env, run_metrics, save_results, target
from machine import LoadWatch
from plots import import_pyplot, save_figure
from report import load_line, targets_block

from onlinemix.core.config import load_config
from onlinemix.data import load_real_images, select_train_ids
from onlinemix.tools.simulate import ORIGINS, Rates, simulate

RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 0.15, 0.05
WASTE_TARGET, STALL_TARGET = 0.05, 0.01
STALLED_S, MIN_STALLED = 0.05, 5  # a step that waited this long for its input; how many make a pipeline period

# What the settings vary: generator speed (steps, batch), max_reuse and the policy.
SETTINGS: dict[str, dict[str, str]] = {
    "slow-real": {"generator.steps": "10", "staleness.policy": "real", "staleness.max_reuse": "4"},
    "fast-real-reuse1": {"generator.steps": "2", "staleness.policy": "real", "staleness.max_reuse": "1"},
    "cached-reuse2": {"generator.steps": "4", "generator.batch_size": "8", "staleness.policy": "cached",
                      "staleness.max_reuse": "2"},
    "wait": {"generator.steps": "4", "staleness.policy": "wait", "staleness.wait_timeout_s": "1"},
    "fast-wait": {"generator.steps": "1", "generator.guidance": "1", "train.batch_size": "64",
                  "staleness.policy": "wait", "staleness.max_reuse": "2"},
    # Where users run: generation hundreds of times slower than training, the default policy, 10 epochs.
    "slow-default": {"generator.steps": "100", "train.epochs": "10"},
}
# Settings also trained without generation, to compare the trainer's speed with the producer and without.
NO_GENERATION = {"train.pairing": "real", "gen_gpus": "0"}
SLOW = ("slow-default",)
SLOW_RATIO, KEPT_TARGET = 100.0, 0.98  # generation at least this much slower than training; speed kept
# Every run: tiny and short, metrics every step, no probes, shards committed often enough to be read back.
COMMON = {"data.resolution": "16", "train.log_every": "1", "probe.enabled": "false", "probe.knn_every": "0",
          "cache.flush_s": "5", "train.cpu_threads": "1", "generator.cpu_threads": "1"}
DEFAULTS = {
    "settings": (",".join(SETTINGS), "fast-real-reuse1"),
    "epochs": (3, 1),
    "real_fraction": (1.0, 0.2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/tradeoff.py",
        description="Run short online trainings on the CPU, simulate each at the rates it measured, and compare\n"
                    "the predicted fresh / cached / disk / fallback fractions of every epoch with the measured ones.",
        epilog="Settings:\n" + "\n".join(f"  {name:<18} {' '.join(f'--{k}={v}' for k, v in o.items())}"
                                         for name, o in SETTINGS.items())
               + "\nEvery run also: " + " ".join(f"--{k}={v}" for k, v in COMMON.items()),
        defaults=DEFAULTS,
        quick_help="one setting, one epoch on a fifth of the digits: a smoke test of the whole path")
    q = p.default_note
    p.add_argument("--settings", default=None, help=f"comma-separated settings to run {q('settings')}")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per run {q('epochs')}")
    p.add_argument("--real-fraction", type=float, default=None,
                   help=f"data.real_fraction of every run: the share of the digits trained on {q('real_fraction')}")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the run directories here (default: a temporary one); a setting whose run directory "
                        "is already there is not trained again, only simulated")
    args = p.parse(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown or not args.settings:
        p.error(f"--settings: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SETTINGS)}")
    p.require_at_least(args, 1, "epochs")
    p.require_fraction(args, "real_fraction")
    return args


# ----------------------------------------------------------------------------- one run

def train(name: str, overrides: dict[str, str], root: Path) -> None:
    """One real online run in a child process, in ``root / name``."""
    flags = [f"--{k}={v}" for k, v in {**overrides, "output_dir": str(root), "run_name": name,
                                       "cache.dir": str(root / f"{name}-cache")}.items()]
    env = repo_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "onlinemix.train", *flags], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench/tradeoff.py: run {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def measured(run_dir: Path) -> dict:
    """What a run's metrics.jsonl says: per-epoch fractions, the rates it saw, waste and stall."""
    rows = run_metrics(run_dir)
    steps, epochs = [r for r in rows if "step" in r], [r for r in rows if "epoch_end" in r]
    last = steps[-1]
    wall = sum(r["step_s"] for r in steps[1:])  # the first step waits for the pipeline to fill: start-up, not stall
    return {
        "epochs": [{**{k: r[k] / sum(r[o] for o in ORIGINS) for k in ORIGINS},
                    "mean_age": r["mean_age"], "mean_reuse": r["mean_reuse"]} for r in epochs],
        "gen_pairs_s": last["generated"] / last["producer_busy_s"],
        "step_s": float(np.mean([r["step_s"] - r["data_wait_s"] for r in steps])),
        "prepare_s": prepare_s(steps[1:]),
        "generated": last["generated"], "evicted_unserved": last["evicted_unserved"],
        "waste": last["evicted_unserved"] / max(1, last["generated"]),
        "stall": sum(r["data_wait_s"] for r in steps[1:]) / max(wall, 1e-9), "wall_s": wall + steps[0]["step_s"],
    }


def trainer_img_s(run_dir: Path) -> float:
    """The trainer's images per second over its steps, the first (which fills the input pipeline) left out."""
    rows = run_metrics(run_dir)
    steps = [r for r in rows if "step" in r][1:]
    return load_config(run_dir / "config.yaml", {}).train.batch_size * len(steps) / sum(r["step_s"] for r in steps)


def against_no_generation(name: str, overrides: dict[str, str], root: Path, gen_pairs_s: float) -> dict:
    """The run's trainer speed against the same run without generation (trained once), and how many times
    faster than generation its training is."""
    if not (root / f"{name}-nogen" / "metrics.jsonl").is_file():
        print(f"{name}: training without generation ({' '.join(f'{k}={v}' for k, v in NO_GENERATION.items())})",
              flush=True)
        train(f"{name}-nogen", {**overrides, **NO_GENERATION}, root)
    with_gen, without = trainer_img_s(root / name), trainer_img_s(root / f"{name}-nogen")
    return {"img_s": with_gen, "no_generation_img_s": without, "kept": with_gen / without,
            "ratio": with_gen / gen_pairs_s}


def prepare_s(steps: list[dict]) -> float:
    """The input pipeline's own time per batch (gather, views), its waits for producers excluded. While the
    trainer waits for its input, batches arrive one pipeline period apart, so a step that waited lasted
    the pipeline's period: its ``step_s`` less the lookup's ``wait_s``. With too few such steps the
    pipeline kept up, its time hidden behind the steps: 0."""
    stalled = [r["step_s"] - r["wait_s"] for r in steps if r["data_wait_s"] > STALLED_S]
    return max(0.0, float(np.median(stalled))) if len(stalled) >= MIN_STALLED else 0.0


def predicted(run_dir: Path, rates: Rates) -> dict:
    """The simulator's run of the same config at the measured rates."""
    cfg = load_config(run_dir / "config.yaml", {})
    train_ids = select_train_ids(load_real_images(cfg.data, cfg.store_root()), cfg.data)
    sim = simulate(cfg, len(train_ids), rates)
    return {"epochs": [{**e.fractions(), "mean_age": e.mean_age, "mean_reuse": e.mean_reuse} for e in sim.epochs],
            "generated": sim.generated, "waste": sim.waste_fraction, "stall": sim.stall_fraction, "wall_s": sim.wall_s}


def tolerance(measured_fraction: float) -> float:
    return max(RELATIVE_TOLERANCE * measured_fraction, ABSOLUTE_TOLERANCE)


def points(name: str, meas: dict, pred: dict) -> list[dict]:
    """One point per (epoch, origin): measured, predicted, error and whether it is within tolerance."""
    out = []
    for epoch, (m, p) in enumerate(zip(meas["epochs"], pred["epochs"], strict=True)):
        for k in ORIGINS:
            error = p[k] - m[k]
            out.append({"setting": name, "epoch": epoch, "origin": k, "measured": m[k], "predicted": p[k],
                        "error": error, "pass": abs(error) <= tolerance(m[k])})
    return out


def targets(res: dict) -> list[dict]:
    """The simulator's tolerance at every point, and the waste and stall targets over the real runs."""
    runs = res["runs"].values()
    stalls = [run["measured"]["stall"] for run in runs if run["policy"] in ("real", "cached")]
    slow = [run["speed"] for run in runs if "speed" in run]
    return [target("validation points within tolerance (share)", res["passed"] / res["points_total"], 1.0, ">=",
                   f"{res['passed']} of {res['points_total']}"),
            target("training / generation speed of the slow runs (slowest generation least)",
                   min((r["ratio"] for r in slow), default=None), SLOW_RATIO, ">="),
            target("trainer speed kept in the slow runs, of the same run without generation (worst run)",
                   min((r["kept"] for r in slow), default=None), KEPT_TARGET, ">="),
            target("generated pairs evicted unserved (worst run)", max(run["measured"]["waste"] for run in runs),
                   WASTE_TARGET, "<="),
            target("trainer stalled on data, real and cached policies (worst run)", max(stalls, default=None),
                   STALL_TARGET, "<=")]


# ----------------------------------------------------------------------------- output

def format_report(res: dict) -> str:
    lines = [f"date        {res['meta']['date']}", load_line(res["meta"]), "",
             f"{'setting':<18} {'epoch':>5} {'origin':<8} {'measured':>8} {'predicted':>9} {'error':>7}  result"]
    for pt in res["points"]:
        lines.append(f"{pt['setting']:<18} {pt['epoch']:>5} {pt['origin']:<8} {pt['measured']:>8.3f} "
                     f"{pt['predicted']:>9.3f} {pt['error']:>+7.3f}  {'PASS' if pt['pass'] else 'MISS'}")
    passed = sum(pt["pass"] for pt in res["points"])
    lines += [f"{passed} of {len(res['points'])} points within tolerance (15% of the measured fraction, at least "
              f"0.05 absolute)", "",
              f"{'setting':<18} {'gen pairs/s':>11} {'step s':>7} {'prep s':>6} {'wall s':>7} {'sim wall s':>10} "
              f"{'waste':>6} {'stall':>6}  targets (waste <= 5%; stall <= 1% under real and cached)"]
    for name, run in res["runs"].items():
        m, p = run["measured"], run["predicted"]
        checks = [f"waste {'ok' if m['waste'] <= WASTE_TARGET else 'MISSED'}"]
        if run["policy"] in ("real", "cached"):
            checks.append(f"stall {'ok' if m['stall'] <= STALL_TARGET else 'MISSED'}")
        lines.append(f"{name:<18} {m['gen_pairs_s']:>11.1f} {m['step_s']:>7.2f} {m['prepare_s']:>6.2f} {m['wall_s']:>7.1f} "
                     f"{p['wall_s']:>10.1f} {m['waste']:>6.1%} {m['stall']:>6.1%}  {', '.join(checks)}")
    for name, run in res["runs"].items():
        if "speed" in run:
            r = run["speed"]
            lines.append(f"{name}: training {r['ratio']:.0f}x faster than generation; trainer {r['img_s']:.0f} "
                         f"img/s, {r['no_generation_img_s']:.0f} without generation: {r['kept']:.1%} kept")
    lines += targets_block(res["targets"], "targets")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/tradeoff.py")
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    x = np.linspace(0, 1, 101)
    ax.plot(x, x, color="black", lw=1, label="predicted = measured")
    band = np.maximum(RELATIVE_TOLERANCE * x, ABSOLUTE_TOLERANCE)
    ax.fill_between(x, x - band, x + band, color="grey", alpha=0.2, label="tolerance")
    markers = dict(zip(ORIGINS, "o^sD", strict=True))
    colours = {name: f"C{i}" for i, name in enumerate(res["runs"])}
    for pt in res["points"]:
        ax.scatter(pt["measured"], pt["predicted"], marker=markers[pt["origin"]], color=colours[pt["setting"]],
                   edgecolor="black" if pt["pass"] else "red", linewidth=0.5 if pt["pass"] else 2, s=40)
    for name, colour in colours.items():
        ax.scatter([], [], color=colour, label=name)
    for origin, marker in markers.items():
        ax.scatter([], [], marker=marker, color="white", edgecolor="black", label=origin)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("measured fraction of second views (per epoch)")
    ax.set_ylabel("simulated fraction")
    ax.set_title("Simulator vs real CPU runs (red edge: outside tolerance)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = output_path(args.out, "bench/tradeoff.py")
    load = LoadWatch()
    runs, all_points = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name in args.settings:
            overrides = {**COMMON, "train.epochs": str(args.epochs), "data.real_fraction": str(args.real_fraction),
                         **SETTINGS[name]}
            run_dir = root / name
            if not (run_dir / "metrics.jsonl").is_file():
                print(f"{name}: training ({' '.join(f'{k}={v}' for k, v in SETTINGS[name].items())})", flush=True)
                train(name, overrides, root)
            meas = measured(run_dir)
            pred = predicted(run_dir, Rates(meas["gen_pairs_s"], meas["step_s"], meas["prepare_s"]))
            runs[name] = {"overrides": overrides, "measured": meas, "predicted": pred,
                          "policy": load_config(run_dir / "config.yaml", {}).staleness.policy}
            if name in SLOW:
                runs[name]["speed"] = against_no_generation(name, overrides, root, meas["gen_pairs_s"])
            all_points += points(name, meas, pred)
    res = {"meta": {"cpu_count": os.cpu_count(),
                    **load.meta(args.quick, "bench/tradeoff.py", argv)},
           "tolerance": {"relative": RELATIVE_TOLERANCE, "absolute": ABSOLUTE_TOLERANCE},
           "runs": runs, "points": all_points,
           "passed": sum(pt["pass"] for pt in all_points), "points_total": len(all_points)}
    res["targets"] = targets(res)
    save_results(res, out, plot, format_report, _T0, started, gap=True)
    return res


if __name__ == "__main__":
    main()
