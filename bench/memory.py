"""Per-rank GPU memory of a training recipe, estimated on the CPU from what autograd saves.

    python bench/memory.py                                   # every recipe in configs/recipes/
    python bench/memory.py --recipes configs/recipes/in1k-simclr.yaml --batch-size 256
    python bench/memory.py --quick                           # one recipe; what tests/test_bench_memory.py runs

For each recipe, the method it trains (backbone + head + loss, ``methods.build_method``) runs one forward
pass in fp32 (the recipes train without mixed precision) on the views one rank gets per sample (SimCLR,
BarlowTwins: two views at data.resolution; DINO under MixDiff: 2 global and 8 local crops), at two batch
sizes, with ``torch.autograd.graph.saved_tensors_hooks`` counting the bytes of every distinct storage
autograd keeps for the backward pass. The saved bytes are linear in the batch (a part per sample, and
a constant part: the BarlowTwins cross-correlation, the loss); the two sizes give both parts, which are
scaled to the recipe's per-rank ``train.batch_size``. Added to them: parameters, their gradients and the
optimizer's state (LARS and SGD: a momentum buffer; AdamW: two moments) in fp32, and DINO's teacher.

Not counted: the CUDA context and cuDNN / cuBLAS workspaces (about 1-3 GB), the allocator's caching
and fragmentation, the batch's uint8 sources and the negatives gathered from other ranks (SimCLR's
logits at 4 ranks x 1024: under 0.5 GB). A recipe is judged to fit when the estimate leaves
``HEADROOM_GB`` of an 80 GB GPU free for them.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import argparse
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from common import REPO, BenchParser, output_path, save_results, target
from machine import LoadWatch
from plots import import_pyplot, save_figure
from report import targets_block

from onlinemix.core.config import Config, load_config
from onlinemix.methods.build import StepInfo, build_method
from onlinemix.methods.dino import DINO
from onlinemix.views.compose import N_GLOBAL_CROPS, Views
from onlinemix.views.recipes import multicrop_sizes
from onlinemix.views.specs import mixdiff_dino_specs

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
GPU_GB = 80.0
HEADROOM_GB = 10.0     # CUDA context, workspaces, allocator caching and fragmentation, gathered negatives
OPTIMIZER_STATES = {"lars": 1, "sgd": 1, "adamw": 2}  # fp32 tensors per parameter the optimizer keeps
GB = 1e9
DEFAULTS = {"sizes": ("2,4", "2,3")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/memory.py",
        description="Estimate each recipe's per-rank GPU memory (fp32 training) from the bytes autograd saves "
                    "for a small batch on the CPU, plus parameters, gradients and optimizer state.",
        epilog="Results: a table on stdout, JSON at --out, a PNG next to it.", defaults=DEFAULTS,
        quick_help="the first recipe at 64 px, batches of 2 and 3: seconds")
    p.add_argument("--recipes", default=None,
                   help="comma-separated recipe files (default: every file in configs/recipes/; --quick: the first)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per-rank batch to estimate (default: each recipe's train.batch_size)")
    p.add_argument("--sizes", default=None,
                   help=f"the two small batches measured, comma-separated {p.default_note('sizes')}")
    p.add_argument("--resolution", type=int, default=None,
                   help="override data.resolution (default: the recipe's; --quick: 64)")
    args = p.parse(argv)
    args.recipes = ([Path(r) for r in args.recipes.split(",") if r] if args.recipes
                    else RECIPES[:1] if args.quick else RECIPES)
    if args.quick and args.resolution is None:
        args.resolution = 64
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    if len(sizes) != 2 or not 0 < sizes[0] < sizes[1]:
        p.error("--sizes takes two increasing positive batch sizes, e.g. 2,4")
    args.sizes = sizes
    p.require_at_least(args, 1, "batch_size", "resolution")
    return args


def view_sizes(cfg: Config) -> list[int]:
    """The side of every view one sample gets: DINO's MixDiff crops, else two views at data.resolution."""
    if cfg.train.method == "dino":
        return [spec.size for spec in mixdiff_dino_specs(*multicrop_sizes(cfg.data.resolution))]
    return [cfg.data.resolution] * 2


def saved_bytes(forward: Callable[[], object], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``forward()`` runs, but for
    those of ``parameters`` (a layer saves its weight; parameters are counted apart)."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def method_forward(method: torch.nn.Module, sizes: list[int], batch: int) -> Callable[[], object]:
    """One training forward pass of ``method`` (loss included) on random views of ``batch`` samples."""
    views = Views([torch.rand(batch, 3, s, s) for s in sizes], N_GLOBAL_CROPS)
    return lambda: method(views, StepInfo(step=0, epoch=0, total_steps=1))


def state_bytes(method: torch.nn.Module, optimizer: str) -> dict[str, int]:
    """fp32 parameters, gradients and optimizer state of the trained modules; DINO's teacher besides."""
    params = sum(p.numel() * p.element_size() for p in method.parameters() if p.requires_grad)
    teacher = (sum(p.numel() * p.element_size() for p in method.teacher.parameters())
               if isinstance(method, DINO) else 0)
    return {"parameters": params, "gradients": params, "optimizer": OPTIMIZER_STATES[optimizer] * params,
            "teacher": teacher}


def estimate(recipe: Path, args: argparse.Namespace) -> dict:
    """One recipe's measurement and its estimate at its per-rank batch."""
    overrides = {"data.resolution": str(args.resolution)} if args.resolution else None
    cfg = load_config(recipe, overrides)
    method = build_method(cfg, num_classes=1000)
    method.train()
    sizes = view_sizes(cfg)
    small, large = (saved_bytes(method_forward(method, sizes, b), method.parameters()) for b in args.sizes)
    per_sample = (large - small) / (args.sizes[1] - args.sizes[0])
    constant = max(0.0, small - per_sample * args.sizes[0])
    batch = args.batch_size or cfg.train.batch_size
    states = state_bytes(method, cfg.train.optimizer)
    activations = constant + per_sample * batch
    total = activations + sum(states.values())
    return {"recipe": recipe.name, "method": cfg.train.method, "backbone": cfg.train.backbone,
            "resolution": cfg.data.resolution, "view_sizes": sizes, "optimizer": cfg.train.optimizer,
            "batch_size": batch, "measured_batches": args.sizes, "saved_bytes": [small, large],
            "activation_bytes_per_sample": per_sample, "activation_bytes_constant": constant,
            "activation_bytes": activations, **{f"{k}_bytes": v for k, v in states.items()},
            "total_bytes": total, "fits": total / GB <= GPU_GB - HEADROOM_GB,
            "largest_fitting_batch": int((((GPU_GB - HEADROOM_GB) * GB - sum(states.values()) - constant)
                                          // per_sample))}


def format_report(res: dict) -> str:
    lines = [f"per-rank memory of fp32 training, estimated from autograd's saved tensors on the CPU "
             f"({res['meta']['date']})", "",
             f"  {'recipe':<24}{'batch':>6}{'act/sample':>11}{'activations':>12}{'states':>8}{'total':>8}"
             f"{'fits':>6}{'max batch':>10}"]
    for r in res["rows"]:
        states = r["total_bytes"] - r["activation_bytes"]
        lines.append(f"  {r['recipe']:<24}{r['batch_size']:>6}{r['activation_bytes_per_sample'] / 1e6:>8.0f} MB"
                     f"{r['activation_bytes'] / GB:>9.1f} GB{states / GB:>5.1f} GB{r['total_bytes'] / GB:>5.1f} GB"
                     f"{'yes' if r['fits'] else 'NO':>6}{r['largest_fitting_batch']:>10}")
    lines += ["", f"fits: total <= {GPU_GB - HEADROOM_GB:g} GB ({HEADROOM_GB:g} GB of an {GPU_GB:g} GB GPU left for "
                  f"the CUDA context, workspaces, allocator and gathered negatives)",
              *targets_block(res["targets"])]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = import_pyplot("bench/memory.py")
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 4))
    x = range(len(rows))
    activations = [r["activation_bytes"] / GB for r in rows]
    ax.bar(x, activations, label="activations")
    ax.bar(x, [(r["total_bytes"] - r["activation_bytes"]) / GB for r in rows], bottom=activations,
           label="parameters, gradients, optimizer, teacher")
    ax.axhline(GPU_GB - HEADROOM_GB, color="k", ls="--", label=f"{GPU_GB - HEADROOM_GB:g} GB")
    ax.set_xticks(list(x), [f"{r['recipe']}\nbatch {r['batch_size']}" for r in rows], fontsize=7)
    ax.set_ylabel("GB per rank")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    out = output_path(args.out, "bench/memory.py")
    started = time.perf_counter()
    load = LoadWatch()
    rows = [estimate(recipe, args) for recipe in args.recipes]
    res = {"meta": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                    **load.meta(args.quick, "bench/memory.py", argv)},
           "config": {"recipes": [str(r) for r in args.recipes], "sizes": args.sizes, "gpu_gb": GPU_GB,
                      "headroom_gb": HEADROOM_GB, "batch_size": args.batch_size, "resolution": args.resolution},
           "rows": rows,
           "targets": [target(f"{r['recipe']}: per-rank GB at batch {r['batch_size']} <= {GPU_GB - HEADROOM_GB:g}",
                              r["total_bytes"] / GB, GPU_GB - HEADROOM_GB, "<=") for r in rows]}
    save_results(res, out, plot, format_report, _T0, started)
    return res


if __name__ == "__main__":
    main()
