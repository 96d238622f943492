"""The trainer's side of the benchmarks: real images/s of the product's trainer step on pairs held in memory
(bench/throughput.py, bench/cache.py), and the cost of a MixDiff step with its pairs ready against a
plain SimCLR step (bench/throughput.py)."""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from common import BenchParser
from shards import write_shards
from timing import Timer
from tqdm.auto import tqdm

from onlinemix.cache.store import CacheReader
from onlinemix.core.config import Config
from onlinemix.data import RealImages
from onlinemix.exchange.aim import AimPublisher
from onlinemix.exchange.lookup import BatchPairs, PairImages, PairSource
from onlinemix.exchange.ring import PairRing, TrainerPort
from onlinemix.train import Trainer

STEP_COST_KEY = "bench-step-cost"
STEP_PARTS = ("lookup", "augment", "compute", "aim")


def add_trainer_flags(p: BenchParser) -> None:
    """--train-batch-size, --train-steps and --train-warmup, with their defaults in ``p.defaults``."""
    q = p.default_note
    p.add_argument("--train-batch-size", type=int, default=None,
                   help=f"real images per trainer step {q('train_batch_size')}")
    p.add_argument("--train-steps", type=int, default=None, help=f"timed trainer steps {q('train_steps')}")
    p.add_argument("--train-warmup", type=int, default=None,
                   help=f"untimed trainer steps before timing {q('train_warmup')}")


def build_trainer(cfg: Config, device: torch.device, real_images: torch.Tensor, batch_size: int,
                  pairing: str | None = None) -> Trainer:
    """One ``onlinemix.train.Trainer`` rank at ``batch_size`` (and ``pairing``, else the config's), built as a run
    builds it, single process (no SyncBatchNorm, no gradient all-reduce), over unlabelled images that all train."""
    tc = replace(cfg.train, batch_size=batch_size, pairing=pairing or cfg.train.pairing)
    n = len(real_images)
    # Unlabelled pairs: every image trains (no held-out split); labels are only read by 'supervised'.
    real = RealImages(real_images, torch.zeros(n, dtype=torch.int64), ["unlabelled"], torch.arange(n),
                      torch.arange(0))
    with tempfile.TemporaryDirectory() as run_dir:
        return Trainer(replace(cfg, train=tc), Accelerator(cpu=device.type == "cpu"), Path(run_dir), real)


def bench_training(cfg: Config, device: torch.device, real_images: torch.Tensor, synthetic_images: torch.Tensor,
                   batch_size: int, steps: int, warmup: int, bar: tqdm) -> dict:
    """Real images/s of the product's trainer step on pairs held in memory (no ring).

    One trainer rank (``build_trainer``). Every second view is synthetic (the mixdiff path with no
    fallbacks). A step is the trainer's ``augment`` (views on the CPU) then ``train_step`` (to the
    device, forward, loss, backward, optimizer step), timed apart.
    """
    tc = cfg.train
    trainer = build_trainer(cfg, device, real_images, batch_size)
    n = len(real_images)
    gen = torch.Generator().manual_seed(tc.seed)
    is_synthetic = torch.ones(batch_size, dtype=torch.bool)

    def step() -> tuple[float, float, float]:
        ids = torch.randint(0, n, (batch_size,), generator=gen)
        batch = BatchPairs(PairImages(real_images[ids], synthetic_images[ids], is_synthetic, ids), {})
        with Timer(device) as t_aug:
            views = trainer.augment(batch)
        with Timer(device) as t_compute:
            value = trainer.train_step(views)  # returns loss.item(): a host sync on CUDA
        trainer.step += 1
        return t_aug.seconds, t_compute.seconds, value

    bar.set_description(f"training b={batch_size} (warm-up)")
    for _ in range(warmup):
        step()
        bar.update()
    bar.set_description(f"training b={batch_size}")
    aug_s, compute_s, losses = [], [], []
    for _ in range(steps):
        a, c, value = step()
        aug_s.append(a)
        compute_s.append(c)
        losses.append(value)
        bar.update()
    total = sum(aug_s) + sum(compute_s)
    return {"batch_size": batch_size, "steps": steps, "warmup_steps": warmup, "img_s": batch_size * steps / total,
            "step_s_mean": total / steps, "augment_s_mean": sum(aug_s) / steps, "compute_s_mean": sum(compute_s) / steps,
            "augment_fraction": sum(aug_s) / total, "last_loss": losses[-1],
            "backbone": tc.backbone, "width": tc.width, "params": sum(p.numel() for p in trainer.model.parameters())}


def warm_cache(root: Path, synthetic_images: torch.Tensor) -> CacheReader:
    """A disk cache holding one variation of every image (``synthetic_images[i]`` of image i), as ``cache warm``
    leaves it, opened for reading."""
    write_shards(root, STEP_COST_KEY, synthetic_images.numpy(), len(synthetic_images))
    return CacheReader(root, STEP_COST_KEY, synthetic_images.shape[-1])


def bench_step_cost(cfg: Config, device: torch.device, real_images: torch.Tensor, synthetic_images: torch.Tensor,
                    batch_size: int, steps: int, warmup: int, bar: tqdm) -> dict:
    """A MixDiff step with its pairs ready vs a plain SimCLR step (``train.pairing real``) on the same batch.

    MixDiff reads the batch's synthetic images from a warm disk cache exactly as offline training does
    (``PairSource`` without a ring: ``CacheReader.take``, then the gather), so it never waits for a
    producer; plain SimCLR gathers the real images alone. Then each makes its two views and steps.
    Both trainers start from the same weights and get the same ids; they take turns, the first of
    each turn alternating, so that drift of the machine hits both alike. MixDiff's step also publishes
    what its pairs taught, as an aimed run's trainer does with the most work (``generator.aim=hard``,
    ``strength=adaptive``: a score and a noise level per image, into a ring's image table). Lookup,
    augmentation, compute and that publication are timed apart; the ratio is of the median step.
    """
    trainers = {"mixdiff": build_trainer(cfg, device, real_images, batch_size, "mixdiff"),
                "simclr": build_trainer(cfg, device, real_images, batch_size, "real")}
    gen = torch.Generator().manual_seed(cfg.train.seed)
    times: dict[str, dict[str, list[float]]] = {k: {part: [] for part in STEP_PARTS} for k in trainers}
    ring = PairRing.local(slots=1, images=len(real_images))
    aim = AimPublisher(TrainerPort(ring, leader=True), replace(cfg.generator, aim="hard", strength="adaptive"))
    with tempfile.TemporaryDirectory() as cache_dir:
        pairs = PairSource(None, cfg.staleness, real_images, cfg.ring.verify_checksums, lambda: None,
                           warm_cache(Path(cache_dir), synthetic_images))

        def step(name: str, ids: np.ndarray, timed: bool) -> None:
            trainer = trainers[name]
            with Timer(device) as t_lookup:
                batch = trainer.batch_pairs(ids, ids, 0, pairs if name == "mixdiff" else None)
            with Timer(device) as t_aug:
                views = trainer.augment(batch)
            with Timer(device) as t_compute:
                trainer.train_step(views)
            with Timer(device) as t_aim:
                if name == "mixdiff":
                    trainer.publish_aim(aim, batch.second)
            trainer.step += 1
            if timed:
                for part, t in zip(STEP_PARTS, (t_lookup, t_aug, t_compute, t_aim)):
                    times[name][part].append(t.seconds)

        for i in range(warmup + steps):
            bar.set_description(f"step cost b={batch_size}" + (" (warm-up)" if i < warmup else ""))
            ids = torch.randperm(len(real_images), generator=gen)[:batch_size].numpy()
            for name in (("mixdiff", "simclr") if i % 2 == 0 else ("simclr", "mixdiff")):
                step(name, ids, i >= warmup)
            bar.update()
    step_s = {k: [sum(parts) for parts in zip(*t.values())] for k, t in times.items()}
    median = {k: statistics.median(v) for k, v in step_s.items()}
    return {"batch_size": batch_size, "steps": steps, "warmup_steps": warmup, "step_s": step_s,
            "parts_s_mean": {k: {part: statistics.fmean(v) for part, v in t.items()} for k, t in times.items()},
            "median_step_s": median, "mixdiff_over_simclr": median["mixdiff"] / median["simclr"]}
