"""The settings bench/aim.py compares and one run of each: a YAML preset per (setting, seed) over the digits
experiment config of the method, trained by digits_table's ``train_once`` (``python -m onlinemix.train`` in its
own process), then read back from the run directory and the run's own cache.

Every generating run gets a cache directory of its own, so that no run serves another's variations, and
``generator.seed`` follows ``train.seed``, so that the seeds repeat the generation's randomness as well as the
data order and the initialisation."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from common import REPO, run_metrics
from digits_table import train_once

from onlinemix.cache.maintenance import describe_keys, key_info

ORIGINS = ("fresh", "cached", "disk", "fallback")


@dataclass(frozen=True)
class Setting:
    """One way to spend the generation budget: the preset's overrides and the training flags they need."""
    name: str
    about: str
    pairing: str = "mixdiff"          # the digits experiment config it builds on: digits-<method>-<pairing>.yaml
    online: bool = True                # producers run during training, held to the budget per epoch
    precompute: bool = False           # `cache warm --variations 1` first, then offline training from that cache
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> key -> value

    def flags(self) -> list[str]:
        """The ``python -m onlinemix.train`` flags this setting sets, as --help spells them."""
        keys = [f"{section}.{key}" for section, values in self.overrides.items() for key in values]
        if self.online:
            keys.append("producer.max_pairs_per_epoch")
        return [f"--{key.replace('_', '-')}" for key in keys]


def make_settings(noise_min: float, noise_max: float) -> dict[str, Setting]:
    """The seven settings, in the table's order; ``adaptive`` moves its noise level within the bounds given."""
    return {s.name: s for s in (
        Setting("real", "plain real pairs, no generation", pairing="real", online=False),
        Setting("precompute", "one variation per training image warmed into a fresh cache first, then offline "
                              "training from it (the paper's way)", online=False, precompute=True),
        Setting("uniform", "online, producers in the trainers' order (generator.aim none)",
                overrides={"generator": {"aim": "none"}}),
        Setting("stale", "online, images whose variation is most worn or missing first (generator.aim stale)",
                overrides={"generator": {"aim": "stale"}}),
        Setting("hard", "online, images whose last pair the model matched worst first (generator.aim hard)",
                overrides={"generator": {"aim": "hard"}}),
        Setting("adaptive", f"uniform, each image's noise level moved by its pair similarity within "
                            f"[{noise_min:g}, {noise_max:g}] (generator.strength adaptive)",
                overrides={"generator": {"aim": "none", "strength": "adaptive", "noise_min": noise_min,
                                         "noise_max": noise_max}}),
        Setting("weighted", "uniform, each pair's loss term weighted by its similarity (train.pair_weighting)",
                overrides={"generator": {"aim": "none"}, "train": {"pair_weighting": True}}),
    )}


def train_help() -> str:
    """``python -m onlinemix.train --help`` of this checkout, which lists every training flag."""
    proc = subprocess.run([sys.executable, "-m", "onlinemix.train", "--help"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        sys.exit(f"python -m onlinemix.train --help failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def missing_flags(settings: list[Setting], help_text: str) -> dict[str, list[str]]:
    """Per setting, the training flags it needs that ``help_text`` does not list (settings lacking none are left
    out): a checkout without them cannot run that setting."""
    listed = set(re.findall(r"--[\w.-]+", help_text))
    missing = {s.name: [f for f in s.flags() if f not in listed] for s in settings}
    return {name: flags for name, flags in missing.items() if flags}


def per_epoch_cap(budget: int, epochs: int) -> int:
    """``producer.max_pairs_per_epoch`` that spends ``budget`` pairs over ``epochs`` epochs."""
    return math.ceil(budget / epochs)


def write_preset(setting: Setting, method: str, seed: int, cap: int, threads: int | None, work: Path) -> Path:
    """The YAML preset of one run, at <work>/seed<seed>/<setting>.yaml (train_once names the run after its
    stem and the seed), with a fresh cache directory <work>/<setting>-seed<seed>-cache."""
    cfg: dict[str, Any] = {"base": str(REPO / "configs" / "experiments" / f"digits-{method}-{setting.pairing}.yaml"),
                           "report_to": "none",
                           "cache": {"dir": str(work / f"{setting.name}-seed{seed}-cache")},
                           "generator": {"seed": seed}, "train": {}}
    for section, values in setting.overrides.items():
        cfg.setdefault(section, {}).update(values)
    if setting.online:
        cfg["producer"] = {"max_pairs_per_epoch": cap}
    if setting.precompute:
        cfg["offline"] = True
    if threads is not None:
        cfg["train"]["cpu_threads"] = threads
        cfg["generator"]["cpu_threads"] = threads
    path = work / f"seed{seed}" / f"{setting.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def warm(preset: Path) -> tuple[int, float]:
    """``cache warm --variations 1`` with the run's own preset (so the same generator settings and cache
    directory); the pairs it generated and its wall seconds."""
    command = [sys.executable, "-m", "onlinemix.cache", "warm", "--config", str(preset), "--variations", "1"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    found = re.search(r"warm done: generated (\d+) pairs", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        sys.exit(f"{' '.join(command)} failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return int(found.group(1)), seconds


def cache_counts(root: Path) -> dict[str, int]:
    """Pairs and distinct images committed to a run's cache, counted from its shard records: what the producers
    (or the warm) actually delivered, next to the count the run reports."""
    if not root.is_dir():
        return {"pairs": 0, "images": 0}
    infos = [key_info(root, key, desc, None) for key, desc in describe_keys(root).items()]
    return {"pairs": sum(i["pairs"] for i in infos), "images": sum(i["images"] for i in infos)}


def children_cpu_s() -> float:
    """CPU seconds (user and system) of the finished child processes so far: a run's CPU time, which load from
    other processes skews far less than its wall time, so that run times can be compared across machines."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(setting: Setting, method: str, epochs: int, seed: int, cap: int, threads: int | None,
             work: Path) -> dict[str, Any]:
    """One run of ``setting`` with ``seed``: its scores, the pairs generated and where its second views came from.

    ``wall_s`` and ``cpu_s`` count a precompute's warm as well as its training."""
    preset = write_preset(setting, method, seed, cap, threads, work)
    cpu_before = children_cpu_s()
    warmed, warm_s = warm(preset) if setting.precompute else (0, 0.0)
    probe = train_once(preset, epochs, seed, work)
    cpu_s = children_cpu_s() - cpu_before
    run_dir = work / f"{setting.name}-seed{seed}"
    summary = json.loads((run_dir / "summary.json").read_text())
    ends = [row for row in run_metrics(run_dir) if "epoch_end" in row]
    knn = [row["knn_top1"] for row in ends if "knn_top1" in row]
    views = {o: int(summary.get("views", {}).get(o, 0)) for o in ORIGINS}
    total = sum(views.values())
    return {"seed": seed, "linear_top1": probe["top1"], "random_init_top1": probe["random_init_top1"],
            "knn_top1": knn[-1] if knn else None,
            "generated": warmed if setting.precompute else int(summary.get("generated", 0)),
            "generated_by_epoch": [int(row.get("generated", 0)) for row in ends],  # in all, at each epoch's end
            "cache": cache_counts(work / f"{setting.name}-seed{seed}-cache"),
            "views": views, "shares": {o: views[o] / total if total else 0.0 for o in ORIGINS},
            "warm_s": warm_s, "train_s": probe["seconds"], "wall_s": warm_s + probe["seconds"], "cpu_s": cpu_s,
            "trainer_images_per_s": summary.get("trainer_images_per_s"),
            "producer_images_per_s": summary.get("producer_images_per_s")}
