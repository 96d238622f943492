"""Generation vs training throughput, measured side by side in one run on one device.

    python bench/throughput.py                       # tiny stub diffuser, CPU (or CUDA when present)
    python bench/throughput.py --quick               # seconds; what tests/test_bench.py runs
    python bench/throughput.py --model lambdalabs/sd-image-variations-diffusers --resolution 256   # on a GPU

Four measurements, each on the current device:

1. generation: images/s of ``DiffusersVariationGenerator.generate`` (the producers' call) and of the
   bare ``pipe(...)`` call on already-preprocessed pixels, per batch size, and their ratio;
2. training: real images/s of the product's trainer step (``Trainer.augment`` then
   ``Trainer.train_step``: the configured method, view recipes and optimizer), pairs held in memory
   (no ring); and the step cost: a MixDiff step with its pairs ready (read from a warm disk cache, as
   offline training does) against a plain SimCLR step (``train.pairing real``) on the same batches, in
   turns (target: <= 1.05x);
3. ring: pairs/s through ``PairRing`` (``ProducerPort.write_pairs``: reserve, write, one
   ``publish_many`` per batch; then take) against a plain numpy
   copy of the same bytes with the same batching;
4. a gen/train split model for a node of ``--node-gpus`` devices, derived from 1 and 2.

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from common import (
    BenchParser,
    Timer,
    cpu_snapshot,
    import_pyplot,
    int_list,
    load_line,
    other_cores_since,
    results_path,
    run_meta,
    save_figure,
    save_results,
    setup_torch,
    target,
    target_line,
    torch_meta,
)
from tqdm.auto import tqdm

from onlinemix.cache.store import CacheReader, ShardWriter
from onlinemix.core.config import ConfigError, load_config
from onlinemix.data import RealImages, load_real_images
from onlinemix.exchange.lookup import BatchPairs, PairImages, PairSource
from onlinemix.exchange.ring import PairRing, ProducerPort
from onlinemix.generation.generator import DiffusersVariationGenerator
from onlinemix.train import Trainer

STEP_COST_TARGET = 1.05  # a MixDiff step with pairs ready <= this x a plain SimCLR step on the same batch
STEP_COST_KEY = "bench-step-cost"

# Values used when a flag is not given: (default run, --quick run).
DEFAULTS = {
    "gen_batch_sizes": ("1,4,16", "1,4"),
    "gen_repeats": (8, 2),
    "train_batch_size": (128, 32),
    "train_steps": (15, 2),
    "train_warmup": (3, 1),
    "ring_pairs": (2048, 256),
    "ring_repeats": (3, 1),
}


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/throughput.py",
        description="Measure, in one run on one device, how many synthetic images/s the generator makes,\n"
                    "how many real images/s a trainer consumes, and how fast pairs move through the\n"
                    "shared-memory ring; then model how to split a node's devices between generation\n"
                    "and training.",
        epilog="Flags left out take the default run's value, or the --quick value when --quick is\n"
               "given (shown as 'default / quick'). Results: a table on stdout, JSON at --out and a\n"
               "PNG plot next to it. Progress bars go to stderr.",
        defaults=DEFAULTS,
        quick_help="shrink every measurement so the run takes well under 30 s on 2 CPU cores (smoke test); "
                   "the numbers are then noisy")
    q = p.default_note
    p.add_torch_flags("The CPU-side augmentation of the trainer step uses these threads too")
    p.add_argument("--model", default=None,
                   help="generator: 'stub' (tiny random-weight StableDiffusionImageVariationPipeline, the "
                        "default) or a hub id / local directory, e.g. lambdalabs/sd-image-variations-diffusers")
    p.add_argument("--revision", default=None, help="hub revision of --model (default: the package's, v2.0)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps per image (default: the package's generator.steps, 10)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; <= 1 disables guidance and halves the UNet work "
                        "(default: the package's generator.guidance, 3.0)")
    p.add_argument("--dtype", default=None, choices=("auto", "fp16", "bf16", "fp32"),
                   help="generator precision (default auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--attention", default=None, choices=("auto", "sdpa", "xformers"),
                   help="generator attention backend (default auto: xformers when it loads, else SDPA)")
    p.add_argument("--resolution", type=int, default=None,
                   help="side of the real/synthetic images in pixels; sets the generator's output size "
                        "(rounded up to a multiple of 8 and of the VAE factor, as the package does), the training crop and the ring's pair size "
                        "(default: the package's data.resolution, 32)")
    p.add_argument("--gen-batch-sizes", default=None,
                   help=f"comma-separated generator batch sizes to measure {q('gen_batch_sizes')}")
    p.add_argument("--gen-repeats", type=int, default=None,
                   help=f"timed calls per batch size, for the wrapper and for the bare pipeline each, after one "
                        f"warm-up call of each; the rate uses the median call {q('gen_repeats')}")
    p.add_argument("--train-batch-size", type=int, default=None,
                   help=f"real images per trainer step {q('train_batch_size')}")
    p.add_argument("--train-steps", type=int, default=None, help=f"timed trainer steps {q('train_steps')}")
    p.add_argument("--train-warmup", type=int, default=None,
                   help=f"untimed trainer steps before timing {q('train_warmup')}")
    p.add_argument("--ring-pairs", type=int, default=None,
                   help=f"pairs written and then taken per ring round; the ring gets this many slots "
                        f"{q('ring_pairs')}")
    p.add_argument("--ring-repeats", type=int, default=None,
                   help=f"timed ring rounds (and numpy rounds), after one warm-up round {q('ring_repeats')}")
    p.add_argument("--node-gpus", type=int, default=8,
                   help="devices per node for the gen/train split table (default 8); the table has one row per "
                        "split g generators + (node-gpus - g) trainers, g = 1 .. node-gpus-1")
    p.add_argument("--max-reuse", default="1,4",
                   help="comma-separated staleness.max_reuse values (times one synthetic view may serve) to "
                        "model in the split table (default 1,4)")
    args = p.parse(argv)
    args.gen_batch_sizes = int_list(p, "--gen-batch-sizes", args.gen_batch_sizes)
    args.max_reuse = int_list(p, "--max-reuse", args.max_reuse)
    p.require_at_least(args, 1, "gen_repeats", "train_batch_size", "train_steps", "ring_pairs", "ring_repeats")
    if args.train_batch_size < 2:
        p.error("--train-batch-size must be >= 2 (NT-Xent needs negatives, BatchNorm needs > 1 sample)")
    p.require_at_least(args, 0, "train_warmup")
    if args.node_gpus < 2:
        p.error("--node-gpus must be >= 2 (at least one generator and one trainer)")
    return args


# ----------------------------------------------------------------------------- helpers

# ----------------------------------------------------------------------------- 1. generation

def bench_generation(gen: DiffusersVariationGenerator, images: torch.Tensor, batch_sizes: list[int], repeats: int,
                     timer: Callable[[], Timer], bar: tqdm) -> list[dict]:
    """Wrapper (``generate``: preprocess, per-image seeds, finite check, resize, uint8) vs bare ``pipe`` call.

    Wrapper and bare calls alternate so that drift of the machine hits both alike. Inputs are uint8
    CPU tensors, as a producer passes them; outputs stay on the device (the producer's ``.cpu()``
    copy is not timed). Rates use the median call.
    """
    cfg = gen.cfg
    rows = []
    for b in batch_sizes:
        idx = torch.arange(b) % images.shape[0]
        batch = images[idx].contiguous()
        seeds = list(range(b))
        pixels = gen.preprocess(batch)  # bare call gets already-preprocessed pixels on the device

        def bare() -> float:
            generators = [torch.Generator(gen.device).manual_seed(s) for s in seeds]
            with torch.inference_mode(), timer() as t:
                gen.pipe(pixels, height=gen.gen_size, width=gen.gen_size, num_inference_steps=cfg.steps,
                         guidance_scale=cfg.guidance, generator=generators, output_type="pt")
            return t.seconds

        def wrapper() -> float:
            with timer() as t:
                gen.generate(batch, seeds)
            return t.seconds

        bar.set_description(f"generation b={b} (warm-up)")
        wrapper(), bare()
        bar.update(2)
        wrapper_s, bare_s = [], []
        bar.set_description(f"generation b={b}")
        for _ in range(repeats):
            wrapper_s.append(wrapper())
            bare_s.append(bare())
            bar.update(2)
        w, p = statistics.median(wrapper_s), statistics.median(bare_s)
        rows.append({"batch_size": b, "wrapper_img_s": b / w, "bare_img_s": b / p, "overhead_ratio": w / p,
                     "wrapper_call_s": wrapper_s, "bare_call_s": bare_s})
    return rows


# ----------------------------------------------------------------------------- 2. training

def build_trainer(cfg, device: torch.device, real_images: torch.Tensor, batch_size: int,
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


def bench_training(cfg, device: torch.device, real_images: torch.Tensor, synthetic_images: torch.Tensor,
                   batch_size: int, steps: int, warmup: int, timer: Callable[[], Timer], bar: tqdm) -> dict:
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
        with timer() as t_aug:
            views = trainer.augment(batch)
        with timer() as t_compute:
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


# ----------------------------------------------------------------------------- 2b. step cost

STEP_PARTS = ("lookup", "augment", "compute")


def warm_cache(root: Path, synthetic_images: torch.Tensor) -> CacheReader:
    """A disk cache holding one variation of every image (``synthetic_images[i]`` of image i), as ``cache warm``
    leaves it, opened for reading."""
    writer = ShardWriter(root, STEP_COST_KEY, {"fingerprint": STEP_COST_KEY, "identity": {}, "dataset": "bench"},
                         synthetic_images.shape[-1], len(synthetic_images), flush_s=float("inf"))
    for i, image in enumerate(synthetic_images.numpy()):
        writer.add(i, i, 0, image)
    writer.close()
    return CacheReader(root, STEP_COST_KEY, synthetic_images.shape[-1])


def bench_step_cost(cfg, device: torch.device, real_images: torch.Tensor, synthetic_images: torch.Tensor,
                    batch_size: int, steps: int, warmup: int, timer: Callable[[], Timer], bar: tqdm) -> dict:
    """A MixDiff step with its pairs ready vs a plain SimCLR step (``train.pairing real``) on the same batch.

    MixDiff reads the batch's synthetic images from a warm disk cache exactly as offline training does
    (``PairSource`` without a ring: ``CacheReader.take``, then the gather), so it never waits for a
    producer; plain SimCLR gathers the real images alone. Then each makes its two views and steps.
    Both trainers start from the same weights and get the same ids; they take turns, the first of
    each turn alternating, so that drift of the machine hits both alike. Lookup, augmentation and
    compute are timed apart; the ratio is of the median step.
    """
    trainers = {"mixdiff": build_trainer(cfg, device, real_images, batch_size, "mixdiff"),
                "simclr": build_trainer(cfg, device, real_images, batch_size, "real")}
    gen = torch.Generator().manual_seed(cfg.train.seed)
    times: dict[str, dict[str, list[float]]] = {k: {part: [] for part in STEP_PARTS} for k in trainers}
    with tempfile.TemporaryDirectory() as cache_dir:
        pairs = PairSource(None, cfg.staleness, real_images, cfg.ring.verify_checksums, lambda: None,
                           warm_cache(Path(cache_dir), synthetic_images))

        def step(name: str, ids: np.ndarray, timed: bool) -> None:
            trainer = trainers[name]
            with timer() as t_lookup:
                batch = trainer.batch_pairs(ids, ids, 0, pairs if name == "mixdiff" else None)
            with timer() as t_aug:
                views = trainer.augment(batch)
            with timer() as t_compute:
                trainer.train_step(views)
            trainer.step += 1
            if timed:
                for part, t in zip(STEP_PARTS, (t_lookup, t_aug, t_compute)):
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


# ----------------------------------------------------------------------------- 3. ring

def bench_ring(cfg, real: np.ndarray, synthetic: np.ndarray, write_batch: int, take_batch: int, repeats: int,
               bar: tqdm) -> dict:
    """Pairs/s through ``PairRing`` in one process vs a numpy copy of the same bytes, same batching.

    A ring round: write ``write_batch`` pairs at a time through ``ProducerPort.write_pairs`` (reserve,
    copy + CRC32, one ``publish_many`` per batch: what a producer does), then ``take`` them ``take_batch`` ids at a time with max_reuse=1 so every slot
    is freed again (what a trainer does; CRC32 verified when ring.verify_checksums). The numpy
    round copies the same pairs into a (N, 2, 3, R, R) array in the same chunks and back out.
    Producer and trainer sides run in different processes in a real run; here their costs add up.
    """
    n, r = real.shape[0], real.shape[-1]
    max_age = cfg.staleness.max_age
    verify = cfg.ring.verify_checksums
    ids = np.arange(n, dtype=np.int64)
    out = np.empty((take_batch, 2, 3, r, r), dtype=np.uint8)
    epochs = np.zeros(n, dtype=np.int64)
    ring = PairRing.create(n, r)
    producer = ProducerPort(ring, capacity=n, lead_factor=0.0)
    try:
        def ring_round() -> tuple[float, float]:
            if ring.occupancy()["free"] < n:  # write_pairs would wait for slots forever
                raise RuntimeError("ring full: a previous round left slots behind")
            t0 = time.perf_counter()
            for s in range(0, n, write_batch):
                e = min(n, s + write_batch)
                written = producer.write_pairs(real[s:e], synthetic[s:e], ids[s:e], ids[s:e], ids[s:e].tolist(),
                                               epochs[s:e], max_age)
                if written != e - s:
                    raise RuntimeError("the ring closed while a batch was written")
            t1 = time.perf_counter()
            for s in range(0, n, take_batch):
                e = min(n, s + take_batch)
                result = ring.take(ids[s:e], ids[s:e], 0, out[: e - s], max_reuse=1, max_age=max_age, verify=verify)
                if not result.found.all():
                    raise RuntimeError(f"ring lost {int((~result.found).sum())} pairs")
            return t1 - t0, time.perf_counter() - t1

        dest = np.empty((n, 2, 3, r, r), dtype=np.uint8)

        def numpy_round() -> tuple[float, float]:
            t0 = time.perf_counter()
            for s in range(0, n, write_batch):
                e = min(n, s + write_batch)
                dest[s:e, 0] = real[s:e]
                dest[s:e, 1] = synthetic[s:e]
            t1 = time.perf_counter()
            for s in range(0, n, take_batch):
                e = min(n, s + take_batch)
                out[: e - s] = dest[s:e]
            return t1 - t0, time.perf_counter() - t1

        bar.set_description(f"ring {n} pairs (warm-up)")
        ring_round(), numpy_round()
        bar.update(2)
        bar.set_description(f"ring {n} pairs")
        ring_w, ring_t, np_w, np_t = [], [], [], []
        for _ in range(repeats):
            w, t = ring_round()
            ring_w.append(w)
            ring_t.append(t)
            w, t = numpy_round()
            np_w.append(w)
            np_t.append(t)
            bar.update(2)
        if ring.header.checksum_errors:
            raise RuntimeError(f"ring reported {ring.header.checksum_errors} checksum errors")
    finally:
        ring.close()
    ring_s, np_s = sum(ring_w) + sum(ring_t), sum(np_w) + sum(np_t)
    pairs = n * repeats
    return {"pairs": n, "slots": n, "resolution": r, "repeats": repeats, "write_batch": write_batch,
            "take_batch": take_batch, "verify_checksums": verify, "pair_bytes": 2 * 3 * r * r,
            "ring_pairs_s": pairs / ring_s, "ring_write_pairs_s": pairs / sum(ring_w),
            "ring_take_pairs_s": pairs / sum(ring_t),
            "numpy_pairs_s": pairs / np_s, "numpy_write_pairs_s": pairs / sum(np_w),
            "numpy_take_pairs_s": pairs / sum(np_t),
            "numpy_over_ring": (pairs / np_s) / (pairs / ring_s)}


# ----------------------------------------------------------------------------- 4. split model

def split_model(train_img_s: float, gen_img_s: float, node_gpus: int, max_reuse: list[int]) -> dict:
    """How to split a node of ``node_gpus`` devices into g generators and t = node_gpus - g trainers.

    This is a MODEL computed from the per-device rates measured above on this one device, not a
    multi-device measurement: it assumes every device runs as fast as the one measured, that
    trainers scale linearly (no all-reduce or data-loading cost) and that generators run at the
    best measured batch size with no producer-side overhead beyond the wrapper (the ring costs are
    measured separately and are orders of magnitude smaller). With each synthetic view serving up
    to ``r`` times (staleness.max_reuse), g generators feed at most g * gen_rate * r trainer images/s,
    so the trainers' throughput with a synthetic view for every image is

        min(t * train_rate, g * gen_rate * r).

    Beyond that point trainers would wait (staleness.policy=wait) or fall back to real views.
    """
    rows = []
    for g in range(1, node_gpus):
        t = node_gpus - g
        rows.append({"gen": g, "train": t, "train_capacity_img_s": t * train_img_s,
                     "gen_capacity_img_s": g * gen_img_s,
                     "throughput_img_s": {str(r): min(t * train_img_s, g * gen_img_s * r) for r in max_reuse}})
    best = {}
    for r in max_reuse:
        top = max(row["throughput_img_s"][str(r)] for row in rows)
        # Among equal throughputs prefer fewer generators (more trainer devices free for other work).
        best[str(r)] = min(row["gen"] for row in rows if row["throughput_img_s"][str(r)] >= top * (1 - 1e-12))
    ratio = train_img_s / gen_img_s
    return {"node_gpus": node_gpus, "max_reuse": max_reuse, "train_img_s": train_img_s, "gen_img_s": gen_img_s,
            "train_over_gen": ratio,
            "gen_devices_per_train_device": {str(r): ratio / r for r in max_reuse}, "rows": rows, "best_gen": best}


# ----------------------------------------------------------------------------- output

def format_report(res: dict) -> str:
    m, g, tr, rg, sp = res["meta"], res["generation"], res["training"], res["ring"], res["split"]
    sc = res["step_cost"]
    lines = [
        f"device      {m['device']}: {m['device_name']}",
        f"threads     torch.get_num_threads() = {m['threads']}"
        + (" (the default on CPU: rates are per core)" if m["device"] == "cpu" and m["threads_default"] else ""),
        f"versions    torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}",
        f"attention   {m['attention']} ({m['attention_reason']})",
        f"generator   {res['config']['model']}, {m['dtype']}, {res['config']['steps']} steps, guidance {res['config']['guidance']}, {res['config']['scheduler']}, "
        f"{res['config']['gen_size']}px out -> {res['config']['resolution']}px",
        f"date        {m['date']}",
        load_line(m),
        "",
        "Generation (median call)",
        f"  {'batch':>5}  {'wrapper img/s':>13}  {'bare img/s':>10}  {'wrapper/bare':>12}",
    ]
    for row in g["rows"]:
        lines.append(f"  {row['batch_size']:>5}  {row['wrapper_img_s']:>13.2f}  {row['bare_img_s']:>10.2f}  "
                     f"{row['overhead_ratio']:>11.3f}x")
    lines += [
        "",
        f"Training (tinycnn w={tr['width']}, {tr['params']:,} params, batch {tr['batch_size']}, "
        f"{tr['steps']} steps after {tr['warmup_steps']} warm-up)",
        f"  {tr['img_s']:.1f} real img/s; {tr['step_s_mean'] * 1e3:.0f} ms/step = "
        f"{tr['augment_s_mean'] * 1e3:.0f} ms augment (CPU, per image) + {tr['compute_s_mean'] * 1e3:.0f} ms "
        f"forward/loss/backward/step ({100 * tr['augment_fraction']:.0f}% augment)",
        "",
        f"Step cost (batch {sc['batch_size']}, {sc['steps']} steps each after {sc['warmup_steps']} warm-up, in turns; "
        f"mean ms per step)",
        f"  {'':<30}  {'lookup':>8}  {'augment':>8}  {'compute':>8}  {'median step':>11}",
        *(f"  {label:<30}  " + "  ".join(f"{1e3 * sc['parts_s_mean'][k][part]:>8.1f}" for part in STEP_PARTS)
          + f"  {1e3 * sc['median_step_s'][k]:>11.1f}"
          for k, label in (("mixdiff", "MixDiff, pairs from warm cache"), ("simclr", "plain SimCLR (pairing real)"))),
        f"  MixDiff / SimCLR = {sc['mixdiff_over_simclr']:.3f}x",
        "",
        f"Ring ({rg['pairs']} pairs of {rg['pair_bytes']} B, write batch {rg['write_batch']}, "
        f"take batch {rg['take_batch']}, checksums {'on' if rg['verify_checksums'] else 'off'})",
        f"  {'':<6}  {'pairs/s':>11}  {'write':>11}  {'take':>11}",
        f"  {'ring':<6}  {rg['ring_pairs_s']:>11,.0f}  {rg['ring_write_pairs_s']:>11,.0f}  {rg['ring_take_pairs_s']:>11,.0f}",
        f"  {'numpy':<6}  {rg['numpy_pairs_s']:>11,.0f}  {rg['numpy_write_pairs_s']:>11,.0f}  {rg['numpy_take_pairs_s']:>11,.0f}",
        f"  numpy copy is {rg['numpy_over_ring']:.1f}x faster than the ring; the ring moves "
        f"{rg['ring_pairs_s'] / g['best_img_s']:.0f}x the best generation rate",
        "",
        f"Training / generation = {tr['img_s']:.1f} / {g['best_img_s']:.2f} (wrapper, batch {g['best_batch_size']}) "
        f"= {sp['train_over_gen']:.2f} generator devices per trainer device for a fresh view of every image "
        f"on every step",
    ]
    for r in sp["max_reuse"]:
        if r != 1:
            lines.append(f"  with each view serving up to max_reuse={r} times: "
                         f"{sp['gen_devices_per_train_device'][str(r)]:.2f}")
    lines += ["", f"Split of a {sp['node_gpus']}-device node (model from the rates above, not measured; "
                  f"img/s with a synthetic view on every image; * = best)"]
    head = f"  {'gen':>3}  {'train':>5}  {'train cap':>10}  {'gen cap':>9}" + "".join(
        f"  {'reuse ' + str(r):>11}" for r in sp["max_reuse"])
    lines.append(head)
    for row in sp["rows"]:
        cells = "".join(f"  {row['throughput_img_s'][str(r)]:>10.1f}{'*' if sp['best_gen'][str(r)] == row['gen'] else ' '}"
                        for r in sp["max_reuse"])
        lines.append(f"  {row['gen']:>3}  {row['train']:>5}  {row['train_capacity_img_s']:>10.1f}  "
                     f"{row['gen_capacity_img_s']:>9.1f}{cells}")
    lines += ["", "Targets", *(target_line(t) for t in res["targets"])]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/throughput.py")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = res["generation"]["rows"]
    bs = [r["batch_size"] for r in rows]
    left.plot(bs, [r["wrapper_img_s"] for r in rows], "o-", label="generate() (wrapper)")
    left.plot(bs, [r["bare_img_s"] for r in rows], "s--", label="pipe() (bare)")
    left.set_xscale("log", base=2)
    left.set_xticks(bs, [str(b) for b in bs])
    left.set_xlabel("generator batch size")
    left.set_ylabel("images / s")
    left.set_title("Generation")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend()

    sp = res["split"]
    g = [r["gen"] for r in sp["rows"]]
    right.plot(g, [r["train_capacity_img_s"] for r in sp["rows"]], ":", color="grey", label="trainer capacity")
    for r in sp["max_reuse"]:
        y = [row["throughput_img_s"][str(r)] for row in sp["rows"]]
        (line,) = right.plot(g, y, "o-", label=f"max_reuse={r}")
        best = sp["best_gen"][str(r)]
        right.plot([best], [y[g.index(best)]], "*", ms=16, color=line.get_color())
    right.set_xlabel(f"generator devices (of {sp['node_gpus']}; the rest train)")
    right.set_ylabel("trainer images / s with a synthetic view")
    right.set_title("Gen/train split (model from per-device rates)")
    right.set_xticks(g)
    right.set_ylim(bottom=0)
    right.grid(alpha=0.3)
    right.legend()
    m = res["meta"]
    fig.suptitle(f"{m['device']}: {m['device_name']}, {m['threads']} thread(s), {res['config']['model']}", fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = setup_torch(args.device, args.threads)

    overrides = {k: str(v) for k, v in {
        "generator.model": args.model, "generator.revision": args.revision, "generator.steps": args.steps,
        "generator.guidance": args.guidance, "generator.dtype": args.dtype, "generator.attention": args.attention,
        "data.resolution": args.resolution}.items() if v is not None}
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        sys.exit(f"bench/throughput.py: {e}")

    out = results_path(args.out, "bench/throughput.py", device.type)
    out.parent.mkdir(parents=True, exist_ok=True)

    # Other processes on the machine skew every number below: measure how much CPU they used meanwhile.
    load_before, before = os.getloadavg()[0], cpu_snapshot()
    real = load_real_images(cfg.data)
    try:
        gen = DiffusersVariationGenerator(cfg.generator, device, cfg.data.resolution)
    except Exception as e:  # a missing model directory, no network for a hub id, xformers requested but absent
        sys.exit(f"bench/throughput.py: cannot build the generator {cfg.generator.model!r}: "
                 f"{e.__class__.__name__}: {e}")
    timer = partial(Timer, device)
    # Synthetic views for the training and ring benchmarks: real outputs of this generator, one call at the
    # largest measured batch size (so no larger than what the generation benchmark asks of the device), tiled.
    n_syn = min(len(real), max(args.gen_batch_sizes))
    synthetic = gen.generate(real.images[:n_syn], list(range(n_syn))).cpu()
    synthetic = synthetic[torch.arange(len(real)) % n_syn]

    total = (2 * len(args.gen_batch_sizes) * (args.gen_repeats + 1) + 2 * (args.train_warmup + args.train_steps)
             + 2 * (args.ring_repeats + 1))
    with tqdm(total=total, unit="call", dynamic_ncols=True) as bar:
        gen_rows = bench_generation(gen, real.images, args.gen_batch_sizes, args.gen_repeats, timer, bar)
        training = bench_training(cfg, device, real.images, synthetic, args.train_batch_size, args.train_steps,
                                  args.train_warmup, timer, bar)
        step_cost = bench_step_cost(cfg, device, real.images, synthetic, args.train_batch_size, args.train_steps,
                                    args.train_warmup, timer, bar)
        idx = np.arange(args.ring_pairs) % len(real)
        ring = bench_ring(cfg, real.images.numpy()[idx], synthetic.numpy()[idx], cfg.generator.batch_size,
                          args.train_batch_size, args.ring_repeats, bar)

    other_cores = other_cores_since(before)
    best = max(gen_rows, key=lambda r: r["wrapper_img_s"])
    generation = {"rows": gen_rows, "repeats": args.gen_repeats, "best_img_s": best["wrapper_img_s"],
                  "best_batch_size": best["batch_size"]}
    res = {
        "meta": {
            **torch_meta(device, args.threads is None),
            "attention": gen.attention, "attention_reason": gen.attention_reason, "dtype": str(gen.dtype).replace("torch.", ""),
            **run_meta(load_before, other_cores, args.quick, "bench/throughput.py", argv),
        },
        "config": {"model": cfg.generator.model, "revision": cfg.generator.revision, "steps": cfg.generator.steps,
                   "guidance": cfg.generator.guidance, "scheduler": cfg.generator.scheduler,
                   "resolution": cfg.data.resolution, "gen_size": gen.gen_size, "clip_size": gen.clip_size,
                   "fingerprint": gen.fingerprint},
        "generation": generation,
        "training": training,
        "step_cost": step_cost,
        "ring": ring,
        "split": split_model(training["img_s"], generation["best_img_s"], args.node_gpus, args.max_reuse),
        "targets": [target("MixDiff step with pairs ready (from a warm cache) / plain SimCLR step, same batch",
                           step_cost["mixdiff_over_simclr"], STEP_COST_TARGET, "<=",
                           f"median step {1e3 * step_cost['median_step_s']['mixdiff']:.1f} vs "
                           f"{1e3 * step_cost['median_step_s']['simclr']:.1f} ms, batch {step_cost['batch_size']}, "
                           f"{step_cost['steps']} steps each")],
    }
    save_results(res, out, plot, format_report, _T0, started, gap=True, after_imports=True)
    return res


if __name__ == "__main__":
    main()
