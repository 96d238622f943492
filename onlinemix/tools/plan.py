"""The planner: how to split each node's devices between producers and trainers, predicted by the simulator.

    python -m onlinemix.plan --gpus 8 --dataset-size 126689 --epochs 100 --rates bench/results/throughput-cuda.json
    python -m onlinemix.plan --gpus 8 --nodes 4 --dataset-size 1281167 --epochs 100 --gen-rate 9.5 --train-rate 1400
    python -m onlinemix.plan --gpus 8 --dataset-size 126689 --gen-rate 1.3 --train-rate 2500 --speedup deep-cache=2.1

For every split of a node's ``--gpus`` devices (g producers, the rest trainers) it simulates the run
(:func:`onlinemix.tools.simulate.simulate`: the product's own ring, claim, eviction and lookup rules on a
virtual clock) and prints the trainers' throughput, epoch and run time, how many distinct variations of
each image the run serves, how fresh the views are and how big the disk cache grows. It marks the
best split (``--objective fastest``, or ``freshest`` within ``--wall-hours``) and compares it with
warming the cache first (``python -m onlinemix.cache warm`` on every device, then offline training).
With ``--speedup NAME=FACTOR`` (a generation speed-up measured by ``bench/generate.py``, e.g. deep-feature
reuse or a distilled student) it plans every split again at that many times the generation rate and shows
the distinct variations per image a run serves with and without each.

Each node's whole share of the dataset is simulated, with its real ring, batches, rates and cache
delays, for ``--sim-epochs`` epochs (by then the producers' lead and the ring's reuse have settled);
later epochs repeat the mean of the last two simulated, except the disk cache's share, which keeps
growing as each epoch's new variations cover more images. A split whose policy makes the trainers
slower than they are without generation (``lost``: more than 2% of their speed) is flagged with ``!``.
Every node trains its share of the dataset with its own ring.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from onlinemix.core.cli import CONFIG_FLAGS_USAGE, add_config_options, at_least, parse_config_args, positive_number
from onlinemix.core.config import Config, ConfigError, load_config
from onlinemix.exchange.lookup import reads_disk
from onlinemix.tools.simulate import EpochResult, Rates, Simulation, simulate

THROTTLE_TOLERANCE = 0.02  # a split whose trainers lose more than this share of their speed is flagged
MIN_BATCHES = 40  # producer batches a simulation lasts for at least: whole batches then count for little


@dataclass(frozen=True)
class DeviceRates:
    """What one device does per second: synthetic pairs generated, real images trained on."""
    gen_img_s: float
    train_img_s: float


@dataclass
class Split:
    """The predicted run with ``gen`` producers and ``train`` trainers on every node."""
    gen: int
    train: int
    throughput_img_s: float     # real images per second the trainers of all nodes go through
    epoch_s: float
    total_s: float
    variations_per_image: float  # distinct synthetic variations of an image served over the run
    fresh: float                 # of all second views, over the run
    synthetic: float             # fresh + cached + disk
    mean_age: float              # epochs, of the synthetic views of the simulated epochs
    cache_gb: float              # synthetic images the producers write to the disk cache over the run
    throttle: float              # share of the trainers' speed without generation that the policy costs them

    @property
    def throttled(self) -> bool:
        return self.throttle > THROTTLE_TOLERANCE


def read_rates(path: Path) -> dict[str, float]:
    """Per-device rates from a benchmark JSON: ``bench/throughput.py`` (generation and training) or
    ``bench/generate.py`` (generation only: give the training rate with --train-rate)."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read rates from {path}: {e}") from None
    out = {}
    if "generation" in res and "best_img_s" in res["generation"]:
        out["gen_img_s"] = res["generation"]["best_img_s"]
    elif "rows" in res and any(r.get("status") == "ok" for r in res["rows"]):
        out["gen_img_s"] = max(r["img_s"] for r in res["rows"] if r.get("status") == "ok")
    if "training" in res and "img_s" in res["training"]:
        out["train_img_s"] = res["training"]["img_s"]
    if not out:
        raise ValueError(f"{path} holds no generation or training rate: expected the JSON of bench/throughput.py "
                         "or bench/generate.py")
    return out


def predict_split(cfg: Config, rates: DeviceRates, gen: int, train: int, nodes: int, dataset_size: int,
                  sim_epochs: int) -> Split:
    """Simulate one node with ``gen`` producers and ``train`` trainers on its whole share of the dataset for
    the first ``sim_epochs`` epochs, and project the rest of the run from them (:func:`project`)."""
    per_node = max(1, dataset_size // nodes)
    step_s = cfg.train.batch_size / rates.train_img_s  # ranks step in lockstep, each on its own batch
    epochs = epochs_to_simulate(cfg, rates.gen_img_s, step_s * (per_node // (train * cfg.train.batch_size)),
                                sim_epochs)
    sim = simulate(cfg, per_node, Rates(rates.gen_img_s, step_s), producers=gen, trainers=train, epochs=epochs)
    run, total_s = project(sim, cfg, per_node)
    global_batch = train * cfg.train.batch_size
    trained = nodes * global_batch * (per_node // global_batch) * cfg.train.epochs  # full batches only
    done = sim.epochs
    simulated_synthetic = sum(e.fresh + e.cached + e.disk for e in done)
    stored = cfg.data.stored_size or cfg.data.resolution
    return Split(gen, train, trained / total_s, done[-1].epoch_s, total_s, run.new_variations / per_node,
                 run.fresh / run.views, (run.fresh + run.cached + run.disk) / run.views,
                 sum(e.age_sum for e in done) / simulated_synthetic if simulated_synthetic else math.nan,
                 nodes * run.generated * 3 * stored * stored / 1e9,
                 1 - trained / (nodes * train * rates.train_img_s) / total_s)


def epochs_to_simulate(cfg: Config, gen_pairs_s: float, epoch_s: float, minimum: int) -> int:
    """At least ``minimum`` epochs, and enough for every producer to make ``MIN_BATCHES`` batches (when
    generation is thousands of times slower than training a batch can take several epochs, and a few
    epochs would count whole batches or none), but never more than the run has."""
    batch_s = cfg.generator.batch_size / gen_pairs_s
    return min(cfg.train.epochs, max(minimum, math.ceil(MIN_BATCHES * batch_s / epoch_s)))


def project(sim: Simulation, cfg: Config, images: int) -> tuple[EpochResult, float]:
    """The whole run's view counts and its time in seconds: the simulated epochs, then each later one as
    the mean of the settled ones (after ``max_age`` + 1 epochs, when ring reuse has settled, or the last
    two), except the disk cache's share, which keeps growing from where the last epoch left it: every
    epoch's new pairs cover a further share of the images, and the views the ring lacks come from the
    cache for the covered ones (policies that read it)."""
    out = sim.total()
    total_s = sim.wall_s
    later = cfg.train.epochs - len(sim.epochs)
    if later <= 0:
        return out, total_s
    settled = sim.epochs[min(cfg.staleness.max_age + 1, len(sim.epochs) - 2):]
    mean = {k: sum(getattr(e, k) for e in settled) / len(settled)
            for k in ("fresh", "cached", "views", "generated", "new_variations", "epoch_s")}
    lacking = mean["views"] - mean["fresh"] - mean["cached"]
    last = sim.epochs[-1]
    covered = last.disk / (last.disk + last.fallback) if last.disk + last.fallback else 0.0
    reads = cfg.cache.enabled and reads_disk(cfg.staleness, online=True)
    growth = 1 - min(1.0, mean["generated"] / images)
    for _ in range(later):
        covered = 1 - (1 - covered) * growth if reads else 0.0
        out.disk += lacking * covered
        out.fallback += lacking * (1 - covered)
    for k in ("fresh", "cached", "generated", "new_variations"):
        setattr(out, k, getattr(out, k) + later * mean[k])
    return out, total_s + later * mean["epoch_s"]


def plan(cfg: Config, rates: DeviceRates, gpus: int, nodes: int, dataset_size: int,
         sim_epochs: int) -> list[Split]:
    splits = []
    for gen in tqdm(range(1, gpus), desc="simulating splits", unit="split", leave=False):
        splits.append(predict_split(cfg, rates, gen, gpus - gen, nodes, dataset_size, sim_epochs))
    return splits


def parse_speedup(text: str) -> tuple[str, float]:
    """``NAME=FACTOR``: a generation speed-up and how many times the plain rate it makes images."""
    name, sep, factor = text.partition("=")
    try:
        value = float(factor)
    except ValueError:
        value = math.nan
    if not sep or not name or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FACTOR with a factor > 0, e.g. deep-cache=2.1")
    return name, value


def with_speedups(cfg: Config, rates: DeviceRates, gpus: int, nodes: int, dataset_size: int, sim_epochs: int,
                  plain: list[Split], speedups: list[tuple[str, float]]) -> str:
    """Per split, the distinct variations per image and the run time at the plain generation rate and at
    each sped-up one."""
    columns = [("plain", 1.0, plain)] + [
        (name, factor, plan(cfg, DeviceRates(rates.gen_img_s * factor, rates.train_img_s), gpus, nodes,
                            dataset_size, sim_epochs)) for name, factor in speedups]
    header = f"{'gen':>3} {'train':>5}" + "".join(f" {f'{name} x{factor:g}':>24}" for name, factor, _ in columns)
    lines = ["distinct variations per image over the run (and the run's time), per generation speed-up:", header]
    for row in range(len(plain)):
        cells = "".join(f" {per_image(s[row].variations_per_image):>12} ({duration(s[row].total_s):>9})"
                        for _, _, s in columns)
        lines.append(f"{plain[row].gen:>3} {plain[row].train:>5}{cells}")
    return "\n".join(lines)


def best_split(splits: list[Split], objective: str, wall_hours: float | None) -> Split | None:
    """The fastest split, or the one serving the most variations per image within ``wall_hours`` (None: none fits)."""
    if objective == "fastest":
        return min(splits, key=lambda s: (s.total_s, s.gen))
    fitting = [s for s in splits if wall_hours is None or s.total_s <= wall_hours * 3600]
    return max(fitting, key=lambda s: (s.variations_per_image, s.fresh, -s.total_s)) if fitting else None


def duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def per_image(variations: float) -> str:
    """Variations per image; small shares keep two significant digits (slow generation serves a fraction of
    a percent)."""
    return f"{variations:.2f}" if variations >= 0.1 else f"{variations:.4f}"


def format_table(splits: list[Split], best: Split | None) -> str:
    lines = [f"{'gen':>3} {'train':>5} {'img/s':>9} {'lost':>6} {'epoch':>9} {'run':>10} {'var/img':>8} "
             f"{'fresh':>7} {'synth':>7} {'age':>5} {'cache GB':>9}"]
    for s in splits:
        mark = "  *" if s is best else ""
        lines.append(f"{s.gen:>3} {s.train:>5} {s.throughput_img_s:>9.1f} {max(0.0, s.throttle):>6.1%} "
                     f"{duration(s.epoch_s):>9} {duration(s.total_s):>10} {per_image(s.variations_per_image):>8} "
                     f"{s.fresh:>7.2%} {s.synthetic:>7.2%} {s.mean_age:>5.2f} {s.cache_gb:>9.2f}"
                     f"{'  !' if s.throttled else ''}{mark}")
    return "\n".join(lines)


def throttle_warning(splits: list[Split], policy: str) -> str | None:
    """One line naming the splits where the policy makes the trainers slower than without generation."""
    slow = [s for s in splits if s.throttled]
    if not slow:
        return None
    which = ", ".join(f"{s.gen}+{s.train} ({s.throttle:.0%} of their speed lost)" for s in slow)
    return (f"! policy {policy} throttles the trainers of {which}: they wait for views that generation cannot "
            f"make in time; staleness.policy cached (the default) or real never waits")


def warm_first(cfg: Config, rates: DeviceRates, gpus: int, nodes: int, dataset_size: int, online: Split) -> str:
    """Warming ``K`` variations on every device, then training offline on every device, against ``online``:
    K is the variations per image the online split serves (at least 1)."""
    k = max(1, round(online.variations_per_image))
    devices = gpus * nodes
    warm_s = dataset_size * k / (devices * rates.gen_img_s)
    train_s = cfg.train.epochs * dataset_size / (devices * rates.train_img_s)
    stored = cfg.data.stored_size or cfg.data.resolution
    text = (f"warm first: {k} variation(s) per image on all {devices} devices ({duration(warm_s)}), then offline "
            f"training on all of them ({duration(train_s)}): {duration(warm_s + train_s)} in all, cache "
            f"{dataset_size * k * 3 * stored * stored / 1e9:.2f} GB, a synthetic view for every image; against "
            f"{duration(online.total_s)} online, a synthetic view for {online.synthetic:.1%} of them")
    if warm_s + train_s < online.total_s:
        return text + ": warming the cache first is better (python -m onlinemix.cache warm --variations " \
                      f"{k}, then train with --offline)"
    return text + ": online is better"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onlinemix.plan",
        usage="%(prog)s --gpus N --dataset-size N (--gen-rate R --train-rate R | --rates JSON) [--epochs N] "
              f"{CONFIG_FLAGS_USAGE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict, for every split of a node's devices into producers and trainers, the trainers' "
                    "throughput, epoch and run time, distinct variations per image, freshness and disk cache size, "
                    "by simulating the online system at per-device rates; mark the best split and say whether "
                    "warming the cache first would be better.",
        epilog="Rates come from a benchmark JSON (--rates: bench/throughput.py gives both, bench/generate.py the "
               "generation rate) or from --gen-rate / --train-rate, which override it. The run's other settings "
               "(train.batch_size per trainer, ring.slots, staleness.*, producer.lead_factor, generator.batch_size, "
               "data.resolution, cache.*) come from --config and the --section.key flags, as for training.")
    p.add_argument("--gpus", type=at_least(2), required=True, help="devices per node (at least one producer and one "
                                                                    "trainer)")
    p.add_argument("--nodes", type=at_least(1), default=1, help="nodes, each split the same way (default 1)")
    p.add_argument("--dataset-size", type=at_least(1), required=True, help="training images")
    p.add_argument("--epochs", type=at_least(1), default=None, help="training epochs (default: train.epochs)")
    p.add_argument("--rates", type=Path, default=None, help="benchmark JSON to read per-device rates from")
    p.add_argument("--gen-rate", type=positive_number, default=None, help="synthetic pairs per second one producer device makes")
    p.add_argument("--train-rate", type=positive_number, default=None, help="real images per second one trainer device uses")
    p.add_argument("--objective", choices=("fastest", "freshest"), default="fastest",
                   help="fastest: the shortest run; freshest: the most distinct variations per image within "
                        "--wall-hours (default fastest)")
    p.add_argument("--wall-hours", type=positive_number, default=None, help="freshest: the longest acceptable run, in hours")
    p.add_argument("--sim-epochs", type=at_least(2), default=None,
                   help="epochs simulated, each on a node's whole share of the dataset; later ones are projected "
                        "from the last two (default: staleness.max_age + 3, by when ring reuse has settled)")
    p.add_argument("--speedup", type=parse_speedup, action="append", default=[], metavar="NAME=FACTOR",
                   help="a generation speed-up measured by bench/generate.py (images/s against the plain pipeline), "
                        "e.g. deep-cache=2.1; every split is planned again with it; repeat for more")
    p.add_argument("--config", type=Path, default=None, help="YAML preset of the training run (see configs/)")
    add_config_options(p)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parse_config_args(parser, argv)
    if args.epochs is not None:
        overrides["train.epochs"] = str(args.epochs)
    try:
        cfg = load_config(args.config, overrides)
        rates = read_rates(args.rates) if args.rates else {}
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    rates.update({k: v for k, v in (("gen_img_s", args.gen_rate), ("train_img_s", args.train_rate)) if v is not None})
    missing = [flag for key, flag in (("gen_img_s", "--gen-rate"), ("train_img_s", "--train-rate")) if key not in rates]
    if missing:
        parser.error(f"no {' or '.join(missing)}: give it, or --rates with a benchmark JSON that has it")
    if min(rates.values()) <= 0:
        parser.error(f"rates must be positive, got {rates}")
    if args.objective == "freshest" and args.wall_hours is None:
        parser.error("--objective freshest needs --wall-hours (the longest acceptable run)")
    device = DeviceRates(**rates)
    try:
        sim_epochs = args.sim_epochs or cfg.staleness.max_age + 3
        splits = plan(cfg, device, args.gpus, args.nodes, args.dataset_size, sim_epochs)
    except ValueError as e:
        sys.exit(f"error: {e}")
    best = best_split(splits, args.objective, args.wall_hours)
    print(f"{args.nodes} node(s) x {args.gpus} devices, {args.dataset_size} images, {cfg.train.epochs} epochs; "
          f"per device {device.gen_img_s:g} pairs/s generated, {device.train_img_s:g} img/s trained; policy "
          f"{cfg.staleness.policy}, max_reuse {cfg.staleness.max_reuse}, ring {cfg.ring.slots} slots")
    print(format_table(splits, best))
    warning = throttle_warning(splits, cfg.staleness.policy)
    if warning:
        print(warning)
    if best is None:
        print(f"* none: no split finishes within {args.wall_hours:g} h; the fastest takes "
              f"{duration(min(s.total_s for s in splits))}")
        return
    print(f"* best ({args.objective}): {best.gen} producer(s) + {best.train} trainer(s) per node")
    print(warm_first(cfg, device, args.gpus, args.nodes, args.dataset_size, best))
    if args.speedup:
        print(with_speedups(cfg, device, args.gpus, args.nodes, args.dataset_size, sim_epochs, splits, args.speedup))


if __name__ == "__main__":
    main()
