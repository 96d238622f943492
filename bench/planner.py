"""The planner (onlinemix.tools.plan) against full simulations of the run it predicts, over the grid of
generation/training ratios users run at and every split of a node.

    python bench/planner.py              # IN-100 (126,689 images), 20 epochs, 1:1 to 1:3000, 1-7 producers
    python bench/planner.py --quick      # a small dataset, 8 epochs, two ratios, 1 and 7 producers
    python bench/planner.py --policy wait --ratios 540 --producers 2   # the wait policy at 1.3 pairs/s

Every point is one node of ``--gpus`` devices, g of them producers making ``train-rate / ratio`` pairs/s
each and the rest trainers taking ``--train-rate`` images/s each, with the default configuration (its
ring, batches, staleness and cache) and ``--policy``. The planner's prediction of the split
(:func:`onlinemix.tools.plan.predict_split`: a few simulated epochs, the rest projected) is compared with
the product's own code run over every epoch on the virtual clock (:func:`onlinemix.tools.simulate.simulate`):
variations per image, synthetic share of second views and trainer throughput, each within 5%. The full
simulation also gives the targets of online generation at that point: the trainers keep >= 98% of
their speed without generation, the ring evicts <= 5% of the generated pairs before they serve, and
the node generates >= 95% of what its producers can make (their summed rate, or the trainers'
consumption if that is lower), counted until the end of training comes within one lead of them
(claims never pass the last position).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import math
import os

from common import BenchParser, int_list, output_path, save_results, target
from machine import LoadWatch
from plots import import_pyplot, save_figure
from report import load_line, targets_block

from onlinemix.core.config import load_config
from onlinemix.tools.plan import DeviceRates, Split, predict_split
from onlinemix.tools.simulate import Rates, Simulation, simulate

AGREEMENT, KEPT, WASTE, GENERATION = 0.05, 0.98, 0.05, 0.95
DEFAULTS = {
    "ratios": ("1,10,100,1000,3000", "10,1000"),
    "producers": ("1,2,3,4,5,6,7", "1,7"),
    "dataset_size": (126_689, 8960),
    "epochs": (20, 8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/planner.py",
        description="Compare the planner's prediction of every split with a simulation of the whole run, over\n"
                    "generation/training ratios, and check the online targets at every point.",
        epilog="Ratios are training images per generated pair per device (1000: one producer device makes 2.4 "
               "pairs/s\nwhile a trainer device takes 2,400 images/s).",
        defaults=DEFAULTS, quick_help="a small dataset, 8 epochs, two ratios, 1 and 7 producers")
    q = p.default_note
    p.add_argument("--ratios", default=None, help=f"comma-separated training/generation ratios {q('ratios')}")
    p.add_argument("--producers", default=None, help=f"comma-separated producers per node {q('producers')}")
    p.add_argument("--gpus", type=int, default=8, help="devices per node (default 8)")
    p.add_argument("--train-rate", type=float, default=2400.0, help="images/s one trainer takes (default 2400)")
    p.add_argument("--dataset-size", type=int, default=None, help=f"training images {q('dataset_size')}")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs {q('epochs')}")
    p.add_argument("--policy", default=None, help="staleness.policy (default: the configuration's default)")
    args = p.parse(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.producers = int_list(p, "--producers", args.producers)
    if not args.ratios or min(args.ratios) <= 0 or not all(1 <= g < args.gpus for g in args.producers):
        p.error("--ratios must be positive and --producers between 1 and --gpus - 1")
    p.require_at_least(args, 2, "epochs")
    return args


def generation_share(sim: Simulation, cfg, gen: int, gen_pairs_s: float, train_img_s: float,
                     step_s: float) -> float | None:
    """Pairs generated per second, of what the producers can usefully make (their summed rate, at most one pair
    per position the trainers take), until the end of training came within a lead (and a batch) of them:
    claims never pass the last position (None: the run is shorter than that)."""
    useful_s = sim.wall_s - cfg.generator.batch_size / gen_pairs_s * (1 + cfg.producer.lead_factor) - step_s
    if useful_s <= 0:
        return None
    return sim.generated_by(useful_s) / (min(gen * gen_pairs_s, train_img_s) * useful_s)


def point(args: argparse.Namespace, ratio: float, gen: int) -> dict:
    """One grid point: the planner's split and the full simulation, side by side."""
    overrides = {"train.epochs": str(args.epochs)} | ({"staleness.policy": args.policy} if args.policy else {})
    cfg = load_config(None, overrides)
    train = args.gpus - gen
    rates = DeviceRates(args.train_rate / ratio, args.train_rate)
    started = time.perf_counter()
    split: Split = predict_split(cfg, rates, gen, train, 1, args.dataset_size, cfg.staleness.max_age + 3)
    plan_s, started = time.perf_counter() - started, time.perf_counter()
    sim = simulate(cfg, args.dataset_size, Rates(rates.gen_img_s, cfg.train.batch_size / args.train_rate),
                   producers=gen, trainers=train)
    sim_s = time.perf_counter() - started
    total = sim.total()
    batch = train * cfg.train.batch_size
    trained = args.epochs * (args.dataset_size // batch) * batch
    full = {"variations_per_image": total.new_variations / args.dataset_size,
            "synthetic": (total.fresh + total.cached + total.disk) / total.views,
            "throughput_img_s": trained / sim.wall_s}
    errors = {k: (getattr(split, k) - v) / v if v else (0.0 if getattr(split, k) == v else math.inf)
              for k, v in full.items()}
    return {"ratio": ratio, "gen": gen, "train": train, "policy": cfg.staleness.policy,
            "planner": {k: getattr(split, k) for k in full} | {"throttle": split.throttle, "flagged": split.throttled},
            "full": full, "errors": errors, "agrees": all(abs(e) <= AGREEMENT for e in errors.values()),
            "kept": full["throughput_img_s"] / (train * args.train_rate),
            "evicted_unserved": sim.waste_fraction, "generated": sim.generated,
            "generation": generation_share(sim, cfg, gen, rates.gen_img_s, train * args.train_rate,
                                           cfg.train.batch_size / args.train_rate),
            "plan_s": plan_s, "sim_s": sim_s}


def targets(points: list[dict]) -> list[dict]:
    gens = [p["generation"] for p in points if p["generation"] is not None]
    return [target("planner within 5% of the full simulation (share of points)",
                   sum(p["agrees"] for p in points) / len(points), 1.0, ">=",
                   f"{sum(p['agrees'] for p in points)} of {len(points)}"),
            target("trainer throughput kept, of no generation (worst point)", min(p["kept"] for p in points), KEPT),
            target("generated pairs evicted unserved (worst point)", max(p["evicted_unserved"] for p in points),
                   WASTE, "<="),
            target("node generation, of what its producers can make (worst point)", min(gens, default=None),
                   GENERATION, ">=", f"{len(gens)} of {len(points)} points long enough to tell")]


def format_report(res: dict) -> str:
    a = res["args"]
    lines = [f"date        {res['meta']['date']}", load_line(res["meta"]),
             f"grid        {a['dataset_size']} images, {a['epochs']} epochs, {a['gpus']} devices per node, "
             f"{a['train_rate']:g} img/s per trainer", "",
             f"{'ratio':>6} {'split':>5} {'policy':>6} {'var/img plan/full':>19} {'synthetic plan/full':>21} "
             f"{'img/s plan/full':>17} {'kept':>6} {'evicted':>7} {'gen':>6}  planner"]
    for p in res["points"]:
        pl, fu = p["planner"], p["full"]
        gen = "n/a" if p["generation"] is None else f"{p['generation']:.1%}"
        flag = f" (flagged: {pl['throttle']:.0%} lost)" if pl["flagged"] else ""
        lines.append(f"1:{p['ratio']:<4g} {p['gen']}+{p['train']:<3} {p['policy']:>6} "
                     f"{pl['variations_per_image']:>9.4f}/{fu['variations_per_image']:<9.4f} "
                     f"{pl['synthetic']:>10.2%}/{fu['synthetic']:<10.2%} "
                     f"{pl['throughput_img_s']:>8.0f}/{fu['throughput_img_s']:<8.0f} {p['kept']:>6.1%} "
                     f"{p['evicted_unserved']:>7.1%} {gen:>6}  {'ok' if p['agrees'] else 'MISS'}{flag}")
    lines += targets_block(res["targets"], "targets")
    return "\n".join(lines)


def plot(res: dict, path) -> None:
    plt = import_pyplot("bench/planner.py")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, label in zip(axes, ("variations_per_image", "synthetic", "throughput_img_s"),
                              ("variations per image", "synthetic share", "trainer img/s"), strict=True):
        full = [p["full"][key] for p in res["points"]]
        planned = [p["planner"][key] for p in res["points"]]
        ax.scatter(full, planned, c=[math.log10(p["ratio"]) for p in res["points"]], cmap="viridis", s=20)
        top = max(full + planned) * 1.05 or 1.0
        ax.plot([0, top], [0, top], color="black", lw=1)
        ax.set_xlabel(f"full simulation: {label}")
        ax.set_ylabel(f"planner: {label}")
        ax.grid(alpha=0.3)
    fig.suptitle("Planner vs full simulation (colour: log10 training/generation ratio)", fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = output_path(args.out, "bench/planner.py")
    load = LoadWatch()
    points = []
    for ratio in args.ratios:
        for gen in args.producers:
            points.append(point(args, ratio, gen))
            print(f"1:{ratio:g} {gen}+{args.gpus - gen}: planner {points[-1]['plan_s']:.1f}s, full simulation "
                  f"{points[-1]['sim_s']:.1f}s", flush=True)
    res = {"meta": {"cpu_count": os.cpu_count(),
                    **load.meta(args.quick, "bench/planner.py", argv)},
           "args": {k: getattr(args, k) for k in ("ratios", "producers", "gpus", "train_rate", "dataset_size",
                                                  "epochs", "policy")},
           "points": points}
    res["targets"] = targets(points)
    save_results(res, out, plot, format_report, _T0, started, gap=True)
    return res


if __name__ == "__main__":
    main()
