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
4. a gen/train split model for a node of ``--node-gpus`` devices, derived from 1 and 2;
5. claims: a producer's claim with generation aimed by the trainers (``generator.aim=hard``) against one in
   the trainers' order, where generation is scarce: trainers at 5,000 images/s, a producer batch of 4 s,
   an image table of ``--claim-images`` rows (target: the aimed claim <= 1% of the batch's time).

See docs/benchmarks.md for how to read the output.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import statistics
import sys

import numpy as np
import torch
from common import BenchParser, int_list, output_path, save_results, setup_torch, target
from gencalls import GeneratorCalls
from machine import LoadWatch, torch_meta
from throughputbench.claims import bench_claims
from throughputbench.report import format_report, plot
from throughputbench.ring import bench_ring
from throughputbench.split import split_model
from timing import in_turns
from tqdm.auto import tqdm
from trainstep import add_trainer_flags, bench_step_cost, bench_training

from onlinemix.core.config import ConfigError, load_config
from onlinemix.data import load_real_images
from onlinemix.generation.generator import DiffusersVariationGenerator

STEP_COST_TARGET = 1.05  # a MixDiff step with pairs ready <= this x a plain SimCLR step on the same batch
CLAIM_SHARE_TARGET = 0.01  # an aimed claim <= this share of a producer batch's time
SCARCE_TRAINER_RATE = 5000.0  # images/s one trainer eats where one GPU generates a few pairs/s ...
SCARCE_BATCH_S = 4.0  # ... 16 of them in this many seconds

# Values used when a flag is not given: (default run, --quick run).
DEFAULTS = {
    "gen_batch_sizes": ("1,4,16", "1,4"),
    "gen_repeats": (8, 2),
    "train_batch_size": (128, 32),
    "train_steps": (15, 2),
    "train_warmup": (3, 1),
    "ring_pairs": (2048, 256),
    "ring_repeats": (3, 1),
    "claim_images": (1_281_167, 100_000),
    "claim_repeats": (50, 5),
}


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
    add_trainer_flags(p)
    p.add_argument("--ring-pairs", type=int, default=None,
                   help=f"pairs written and then taken per ring round; the ring gets this many slots "
                        f"{q('ring_pairs')}")
    p.add_argument("--ring-repeats", type=int, default=None,
                   help=f"timed ring rounds (and numpy rounds), after one warm-up round {q('ring_repeats')}")
    p.add_argument("--claim-images", type=int, default=None,
                   help=f"images of the dataset the claims choose from (default: ImageNet-1K's) {q('claim_images')}")
    p.add_argument("--claim-repeats", type=int, default=None,
                   help=f"timed claims of each kind; the median counts {q('claim_repeats')}")
    p.add_argument("--node-gpus", type=int, default=8,
                   help="devices per node for the gen/train split table (default 8); the table has one row per "
                        "split g generators + (node-gpus - g) trainers, g = 1 .. node-gpus-1")
    p.add_argument("--max-reuse", default="1,4",
                   help="comma-separated staleness.max_reuse values (times one synthetic view may serve) to "
                        "model in the split table (default 1,4)")
    args = p.parse(argv)
    args.gen_batch_sizes = int_list(p, "--gen-batch-sizes", args.gen_batch_sizes)
    args.max_reuse = int_list(p, "--max-reuse", args.max_reuse)
    p.require_at_least(args, 1, "gen_repeats", "train_batch_size", "train_steps", "ring_pairs", "ring_repeats",
                       "claim_repeats")
    p.require_at_least(args, 1024, "claim_images")  # one node batch of the trainers
    if args.train_batch_size < 2:
        p.error("--train-batch-size must be >= 2 (NT-Xent needs negatives, BatchNorm needs > 1 sample)")
    p.require_at_least(args, 0, "train_warmup")
    if args.node_gpus < 2:
        p.error("--node-gpus must be >= 2 (at least one generator and one trainer)")
    return args


def bench_generation(gen: DiffusersVariationGenerator, images: torch.Tensor, batch_sizes: list[int], repeats: int,
                     device: torch.device, bar: tqdm) -> list[dict]:
    """The wrapper (``generate``) against the bare ``pipe`` call per batch size, in turns after one warm-up turn,
    so that drift of the machine hits both alike. Rates use the median call."""
    rows = []
    for b in batch_sizes:
        calls = GeneratorCalls(gen, images, b, gen.cfg.steps, gen.cfg.guidance, device)
        bar.set_description(f"generation b={b} (warm-up)")
        in_turns((calls.wrapper, calls.bare), 1, lambda: bar.update(2))
        bar.set_description(f"generation b={b}")
        wrapper_s, bare_s = in_turns((calls.wrapper, calls.bare), repeats, lambda: bar.update(2))
        w, p = statistics.median(wrapper_s), statistics.median(bare_s)
        rows.append({"batch_size": b, "wrapper_img_s": b / w, "bare_img_s": b / p, "overhead_ratio": w / p,
                     "wrapper_call_s": wrapper_s, "bare_call_s": bare_s})
    return rows


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

    out = output_path(args.out, "bench/throughput.py", device.type)
    load = LoadWatch()  # other processes on the machine skew every number below
    real = load_real_images(cfg.data)
    try:
        gen = DiffusersVariationGenerator(cfg.generator, device, cfg.data.resolution)
    except Exception as e:  # a missing model directory, no network for a hub id, xformers requested but absent
        sys.exit(f"bench/throughput.py: cannot build the generator {cfg.generator.model!r}: "
                 f"{e.__class__.__name__}: {e}")
    # Synthetic views for the training and ring benchmarks: real outputs of this generator, one call at the
    # largest measured batch size (so no larger than what the generation benchmark asks of the device), tiled.
    n_syn = min(len(real), max(args.gen_batch_sizes))
    synthetic = gen.generate(real.images[:n_syn], list(range(n_syn))).cpu()
    synthetic = synthetic[torch.arange(len(real)) % n_syn]

    total = (2 * len(args.gen_batch_sizes) * (args.gen_repeats + 1) + 2 * (args.train_warmup + args.train_steps)
             + 2 * (args.ring_repeats + 1))
    with tqdm(total=total, unit="call", dynamic_ncols=True) as bar:
        gen_rows = bench_generation(gen, real.images, args.gen_batch_sizes, args.gen_repeats, device, bar)
        training = bench_training(cfg, device, real.images, synthetic, args.train_batch_size, args.train_steps,
                                  args.train_warmup, bar)
        step_cost = bench_step_cost(cfg, device, real.images, synthetic, args.train_batch_size, args.train_steps,
                                    args.train_warmup, bar)
        idx = np.arange(args.ring_pairs) % len(real)
        ring = bench_ring(cfg, real.images.numpy()[idx], synthetic.numpy()[idx], cfg.generator.batch_size,
                          args.train_batch_size, args.ring_repeats, bar)
        claims = bench_claims(args.claim_images, SCARCE_TRAINER_RATE, SCARCE_BATCH_S, args.claim_repeats)

    load.stop()
    best = max(gen_rows, key=lambda r: r["wrapper_img_s"])
    generation = {"rows": gen_rows, "repeats": args.gen_repeats, "best_img_s": best["wrapper_img_s"],
                  "best_batch_size": best["batch_size"]}
    res = {
        "meta": {
            **torch_meta(device, args.threads is None),
            "attention": gen.attention, "attention_reason": gen.attention_reason,
            "dtype": str(gen.dtype).replace("torch.", ""),
            **load.meta(args.quick, "bench/throughput.py", argv),
        },
        "config": {"model": cfg.generator.model, "revision": cfg.generator.revision, "steps": cfg.generator.steps,
                   "guidance": cfg.generator.guidance, "scheduler": cfg.generator.scheduler,
                   "resolution": cfg.data.resolution, "gen_size": gen.gen_size, "clip_size": gen.clip_size,
                   "fingerprint": gen.fingerprint},
        "generation": generation,
        "training": training,
        "step_cost": step_cost,
        "ring": ring,
        "claims": claims,
        "split": split_model(training["img_s"], generation["best_img_s"], args.node_gpus, args.max_reuse),
        "targets": [target("MixDiff step with pairs ready (from a warm cache) / plain SimCLR step, same batch",
                           step_cost["mixdiff_over_simclr"], STEP_COST_TARGET, "<=",
                           f"median step {1e3 * step_cost['median_step_s']['mixdiff']:.1f} vs "
                           f"{1e3 * step_cost['median_step_s']['simclr']:.1f} ms, batch {step_cost['batch_size']}, "
                           f"{step_cost['steps']} steps each"),
                    target("aimed claim (generator.aim=hard) / a producer batch's time, generation scarce",
                           claims["aimed_share_of_batch"], CLAIM_SHARE_TARGET, "<=",
                           f"{1e3 * claims['aimed_claim_s']:.2f} ms over {claims['aimed_span']:,} positions of "
                           f"{claims['images']:,} images vs {1e3 * claims['plain_claim_s']:.2f} ms unaimed, "
                           f"batch {claims['batch_s']:g} s")],
    }
    save_results(res, out, plot, format_report, _T0, started, gap=True, after_imports=True)
    return res


if __name__ == "__main__":
    main()
