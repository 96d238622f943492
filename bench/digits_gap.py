"""Why MixDiff trails real pairs on the digits: the measurements of docs/digits-gap.md.

    python bench/digits_gap.py            # every arm, 3 epochs, seeds 1 2 3, 3 cached variations (~30 min on one core)
    python bench/digits_gap.py --quick    # 1 epoch, seed 1, 1 variation, three arms: checks the script (~2-3 min)

SimCLR on the bundled digits (configs/experiments/digits-simclr-*.yaml, digits-tiny), one training run per
arm and seed, each ``python -m onlinemix.train`` in its own process, scored by its end-of-run linear probe on the
held-out real digits:

* ``real``: real pairs; ``mixdiff-online``: MixDiff with its producer, its own empty cache (so every run starts
  as a single online run does: most second views fall back to a real one in short runs);
* ``mixdiff-offline`` and ``synthetic-offline``: from a cache warmed with ``--variations`` variations of every
  training image (``python -m onlinemix.cache warm``), so every pair has a synthetic image;
* ``mixdiff-matched``: offline from a copy of that cache in which each variation is made grey and its grey levels
  replaced, rank for rank, by its source digit's (the same intensity histogram as the real image);
* ``mixdiff-filtered``: offline from the variations that the digits classifier of ``python -m onlinemix.tinymodel
  quality`` labels as their source's class only (images left without one fall back to real pairs);
* ``mixdiff-real-recipe``: offline, with the real branch's augmentation (blur p 1, no solarisation) on the
  synthetic branch too (the ``simclr`` recipe patched in the training process; no file changes);
* ``mixdiff-one-variation``: offline from the first variation of each image only, served in every epoch.

Beside the runs, on the training digits and their first cached variation: per-image low-level statistics of real
and synthetic images, and how well a logistic regression tells real from synthetic (on held-out images, 70/30
split by image) from those statistics or the pixels, on the images and on one training view of each (the real
branch's recipe on the real image, the synthetic branch's on the variation); the real digits on both sides (each
side with its branch's recipe) show what the recipes alone give away.
Results: a Markdown table and JSON at --out, and a plot next to them. Pin it to one core with
``taskset -c 1``; with --threads 1 every run is deterministic, whatever else the machine runs.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the reported wall time includes them

import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import REPO, BenchParser, only_list, output_path, repo_env, save_results, scratch_dir
from machine import LoadWatch, cpu_meta
from plots import import_pyplot, save_figure
from report import load_line
from tqdm.auto import tqdm

from onlinemix.cache.store import ShardWriter
from onlinemix.core.config import DataConfig
from onlinemix.data import load_real_images
from onlinemix.views.recipes import IMAGENET_MEAN, IMAGENET_STD, simclr_views

EXPERIMENTS = REPO / "configs" / "experiments"
# arm -> (pairing, cache: None = online with its own empty cache, else the warmed cache's variant), recipe patch
ARMS: dict[str, tuple[str, str | None, str]] = {
    "real": ("real", None, ""),
    "mixdiff-online": ("mixdiff", None, ""),
    "mixdiff-offline": ("mixdiff", "raw", ""),
    "synthetic-offline": ("synthetic", "raw", ""),
    "mixdiff-matched": ("mixdiff", "matched", ""),
    "mixdiff-filtered": ("mixdiff", "filtered", ""),
    "mixdiff-real-recipe": ("mixdiff", "raw", "real"),
    "mixdiff-one-variation": ("mixdiff", "first", ""),
}
QUICK_ARMS = ("real", "mixdiff-offline", "mixdiff-matched")
DEFAULTS = {"epochs": (3, 1), "variations": (3, 1), "images": (0, 300)}
# The training process of a patched recipe: the synthetic branch gets the real branch's augmentation.
PATCHED_TRAIN = ("import sys\nfrom onlinemix.views import recipes\nr = recipes.RECIPES['simclr']\n"
                 "recipes.RECIPES['simclr'] = {'real': r['real'], 'synthetic': r['real']}\n"
                 "from onlinemix.train import main\nmain(sys.argv[1:])\n")


def parse_args(argv: list[str] | None):
    p = BenchParser("bench/digits_gap.py", description=__doc__.split("\n\n")[0],
                    epilog="Flags left out take the full value, or the --quick value with --quick.",
                    defaults=DEFAULTS, quick_help="1 epoch, seed 1, 1 variation, 300 images, arms "
                                                  + ", ".join(QUICK_ARMS))
    p.add_argument("--epochs", type=int, default=None, help=f"train.epochs of every run {p.default_note('epochs')}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed of each repeat (default 1 2 3 / quick 1)")
    p.add_argument("--variations", type=int, default=None,
                   help=f"variations per training image in the warmed cache {p.default_note('variations')}")
    p.add_argument("--images", type=int, default=None,
                   help=f"training digits the image measurements use, 0 = all {p.default_note('images')}")
    p.add_argument("--only", default=None, help=f"comma-separated arms (default all; quick {','.join(QUICK_ARMS)}): "
                                                + ", ".join(ARMS))
    p.add_argument("--threads", type=int, default=1, help="train.cpu_threads and generator.cpu_threads (default 1)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="keep the caches and runs in DIR/digits-gap (default: removed); a run or derived cache "
                        "already there is reused, the warmed cache completed")
    args = p.parse(argv)
    p.require_at_least(args, 1, "epochs", "variations", "threads")
    p.require_at_least(args, 0, "images")
    args.seeds = args.seeds or ([1] if args.quick else [1, 2, 3])
    args.only = only_list(p, args.only, list(ARMS), "arm") or list(QUICK_ARMS if args.quick else ARMS)
    return args


# ----------------------------------------------------------------------------- caches

def run_checked(command: list[str], threads: int) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env=repo_env(TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads)))
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")


def read_cache(root: Path) -> tuple[Path, list[tuple[dict, np.ndarray]]]:
    """The one key of a raw cache, and (commit record, its images) of every committed shard."""
    (key_dir,) = [p.parent for p in root.glob("*/generator.json")]
    shards = []
    for record_path in sorted((key_dir / "index").glob("*.json")):
        record = json.loads(record_path.read_text())
        shards.append((record, np.load(key_dir / "shards" / record["shard"])[:record["pairs"]]))
    return key_dir, shards


def grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float grey levels (B, H*W) on [0, 255]."""
    return images.float().mean(dim=1).flatten(1)


def matched(synthetic: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each synthetic image made grey, its grey levels replaced rank for rank by its real source's."""
    levels, out = grey(real).sort(dim=1).values, torch.empty(synthetic.shape[0], synthetic[0, 0].numel())
    out.scatter_(1, grey(synthetic).argsort(dim=1, stable=True), levels)
    return out.round().clamp(0, 255).to(torch.uint8).view(-1, 1, *synthetic.shape[2:]).expand(-1, 3, -1, -1)


def derived_cache(src: Path, dst: Path, variant: str, real, classifier) -> dict[str, int]:
    """A copy of cache ``src`` under the same key: ``matched`` images, only the ``filtered`` variations the
    classifier gives their source's class, or only the ``first`` variation of each image (made for epoch 0)."""
    key_dir, shards = read_cache(src)
    total = sum(len(record["ids"]) for record, _ in shards)
    if dst.is_dir():  # made by an earlier run into --runs-dir
        return {"kept": sum(len(record["ids"]) for record, _ in read_cache(dst)[1]), "total": total}
    desc = {k: v for k, v in json.loads((key_dir / "generator.json").read_text()).items()
            if k not in ("version", "resolution")}
    writer = ShardWriter(dst, key_dir.name, desc, shards[0][0]["resolution"], 256, float("inf"))
    kept = 0
    for record, data in shards:
        ids, images = torch.tensor(record["ids"]), torch.from_numpy(np.ascontiguousarray(data))
        if variant == "matched":
            images, keep = matched(images, real.images[ids]), torch.ones(len(ids), dtype=torch.bool)
        elif variant == "first":
            keep = torch.tensor(record["epochs"]) == 0
        else:
            keep = classifier.predict(images) == real.labels[ids]
        for i in torch.nonzero(keep).flatten().tolist():
            writer.add(record["ids"][i], record["seeds"][i], record["epochs"][i], images[i].contiguous().numpy())
        kept += int(keep.sum())
    writer.close()
    return {"kept": kept, "total": total}


# ----------------------------------------------------------------------------- image measurements

def image_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image low-level statistics of uint8 (B, 3, H, W) images, on [0, 1]."""
    x = images.float() / 255
    g = x.mean(dim=1)
    flat = g.flatten(1)
    dx, dy = g[:, :, 1:] - g[:, :, :-1], g[:, 1:] - g[:, :-1]
    gradient = (dx[:, :-1] ** 2 + dy[:, :, :-1] ** 2).sqrt().flatten(1).mean(1)
    power = torch.fft.fft2(g - g.mean(dim=(1, 2), keepdim=True)).abs() ** 2
    f = torch.fft.fftfreq(g.shape[-1]) * g.shape[-1]
    beyond_native = ((f[:, None] ** 2 + f[None] ** 2).sqrt() > 4).float()  # above the 8 px digits' Nyquist
    return {"mean": flat.mean(1), "contrast (std)": flat.std(1), "max": flat.max(1).values,
            "background (darkest 25%)": flat.sort(1).values[:, :flat.shape[1] // 4].mean(1),
            "ink (> 0.5)": (flat > 0.5).float().mean(1), "edge (mean gradient)": gradient,
            "high frequencies (power share)": (power * beyond_native).flatten(1).sum(1)
            / power.flatten(1).sum(1).clamp_min(1e-12),
            "tint (channel differences)": ((x[:, 0] - x[:, 1]).abs() + (x[:, 1] - x[:, 2]).abs()).mean(dim=(1, 2))}


def logistic_accuracy(real: torch.Tensor, synthetic: torch.Tensor, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression telling rows of ``real`` (B, D) from those of ``synthetic``
    (standardised features, L-BFGS, a little L2); 70/30 split by image, the two sets of one image together."""
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:int(0.7 * len(real))], perm[int(0.7 * len(real)):]
    def xy(rows):
        return (torch.cat([real[rows], synthetic[rows]]),
                torch.cat([torch.zeros(len(rows)), torch.ones(len(rows))]))
    (x, y), (xt, yt) = xy(train), xy(test)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b > 0).float() == yt).float().mean())


def views(images: torch.Tensor, synthetic_recipe: bool, seed: int) -> torch.Tensor:
    """One training view of each image (the simclr recipe's branch), back on uint8 pixels."""
    torch.manual_seed(seed)
    transform = simclr_views(images.shape[-1], synthetic_recipe)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((torch.stack([transform(i) for i in images]) * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def separability(real: torch.Tensor, synthetic: torch.Tensor) -> dict[str, float]:
    """Real-vs-synthetic accuracy from the statistics and from the pixels, of the images and of their views."""
    def stats(x):
        return torch.stack(list(image_stats(x).values()), dim=1)
    def pixels(x):
        return x.float().flatten(1) / 255
    real_views, synthetic_views = views(real, False, 1), views(synthetic, True, 2)
    return {"images, statistics": logistic_accuracy(stats(real), stats(synthetic)),
            "images, sorted grey levels": logistic_accuracy(grey(real).sort(1).values, grey(synthetic).sort(1).values),
            "images, pixels": logistic_accuracy(pixels(real), pixels(synthetic)),
            "views, statistics": logistic_accuracy(stats(real_views), stats(synthetic_views)),
            "views, pixels": logistic_accuracy(pixels(real_views), pixels(synthetic_views))}


def measure_images(warm: Path, real, classifier, n: int) -> dict[str, Any]:
    """Statistics, separability (raw and matched variations) and class kept, on each training digit's variation 0."""
    _, shards = read_cache(warm)
    ids = torch.tensor([i for r, _ in shards for i, e in zip(r["ids"], r["epochs"]) if e == 0])
    images = torch.from_numpy(np.concatenate([d[np.array(r["epochs"]) == 0] for r, d in shards]))
    order = ids.argsort()[:n or None]
    ids, synthetic = ids[order], images[order]
    source = real.images[ids]
    kinds = {"real": source, "synthetic": synthetic, "matched": matched(synthetic, source)}
    stats = {kind: {k: [float(v.mean()), float(v.std())] for k, v in image_stats(x).items()} for kind, x in kinds.items()}
    control = separability(source, source.clone())  # real digits on both sides: what the two recipes give away
    return {"images": len(ids), "stats": stats, "control": control,
            "separability": {kind: separability(source, kinds[kind]) for kind in ("synthetic", "matched")},
            "class_kept_variation0": classifier.accuracy(synthetic, real.labels[ids])}


# ----------------------------------------------------------------------------- training runs

def train_once(arm: str, seed: int, args, caches: dict[str, Path], work: Path) -> dict[str, Any]:
    pairing, cache, recipe = ARMS[arm]
    name = f"{arm}-e{args.epochs}-seed{seed}"
    entry = ["-c", PATCHED_TRAIN] if recipe else ["-m", "onlinemix.train"]
    command = [sys.executable, *entry, "--config", str(EXPERIMENTS / f"digits-simclr-{pairing}.yaml"),
               "--train.epochs", str(args.epochs), "--train.seed", str(seed), "--output-dir", str(work / "runs"),
               "--run-name", name, "--train.cpu_threads", str(args.threads),
               "--generator.cpu_threads", str(args.threads)]
    if cache is None:
        command += ["--cache.dir", str(work / "caches" / f"online-{name}")]
    else:
        command += ["--offline", "true", "--cache.dir", str(caches[cache]), "--cache.min_coverage", "0.5"]
    run, start = work / "runs" / name, time.perf_counter()
    reused = (run / "probe.json").is_file()  # a run of an earlier call with the same --runs-dir
    if not reused:
        run_checked(command, args.threads)
    summary = json.loads((run / "summary.json").read_text())
    return {"seed": seed, "seconds": None if reused else time.perf_counter() - start, "train_s": summary["train_s"],
            "top1": json.loads((run / "probe.json").read_text())["trained"]["top1"], "views": summary["views"]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    scores = [r["top1"] for r in runs]
    views_ = {k: sum(r["views"][k] for r in runs) for k in runs[0]["views"]}
    total = sum(views_.values())
    return {"top1_mean": statistics.fmean(scores), "top1_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "synthetic_share": 1 - views_["fallback"] / total if total else 0.0, "views": views_, "runs": runs}


# ----------------------------------------------------------------------------- report

def markdown(res: dict[str, Any]) -> str:
    c, img = res["config"], res["images"]
    lines = ["| arm | linear probe top-1 (%) | minus real, same seed | second views synthetic |", "|---|---:|---:|---:|"]
    for arm, cell in res["arms"].items():
        share = f"{cell['synthetic_share']:.0%}" if ARMS[arm][0] != "real" else "-"
        diff = f"{cell['vs_real_mean']:+.2f} ± {cell['vs_real_std']:.2f}" if "vs_real_mean" in cell else "-"
        lines.append(f"| {arm} | {cell['top1_mean']:.2f} ± {cell['top1_std']:.2f} | {diff} | {share} |")
    kept = res["filtered"]
    lines.append(f"\nSimCLR, {c['epochs']} epochs, seeds {', '.join(map(str, c['seeds']))}; warmed cache: "
                 f"{c['variations']} variation(s) per training digit"
                 + (f"; the filtered cache kept {kept['kept']} of {kept['total']} variations" if kept else "") + ".\n")
    lines += [f"Image statistics, {img['images']} training digits and their variation 0 (mean ± std per image):", "",
              "| statistic | real | synthetic | matched |", "|---|---:|---:|---:|"]
    for stat in img["stats"]["real"]:
        lines.append(f"| {stat} | " + " | ".join("{:.4f} ± {:.4f}".format(*img["stats"][k][stat])
                                                for k in ("real", "synthetic", "matched")) + " |")
    lines += ["", "Real-vs-synthetic accuracy of a logistic regression (held-out images; chance 0.5):", "",
              "| features | synthetic | matched | real vs real (recipes only) |", "|---|---:|---:|---:|"]
    for feat in img["control"]:
        lines.append(f"| {feat} | {img['separability']['synthetic'][feat]:.3f} | "
                     f"{img['separability']['matched'][feat]:.3f} | {img['control'][feat]:.3f} |")
    lines.append(f"\nClass kept (digits classifier) by variation 0: {img['class_kept_variation0']:.1%}.")
    return "\n".join(lines)


def format_report(res: dict[str, Any]) -> str:
    return markdown(res) + "\n" + load_line(res["meta"])


def plot(res: dict[str, Any], path: Path) -> None:
    plt = import_pyplot("bench/digits_gap.py")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    arms = list(res["arms"])
    cells = [res["arms"][a] for a in arms]
    ax.bar(range(len(arms)), [c["top1_mean"] for c in cells], yerr=[c["top1_std"] for c in cells],
           color=["grey" if a == "real" else "tab:blue" for a in arms])
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    low = min(c["top1_mean"] - c["top1_std"] for c in cells)
    ax.set(ylabel="linear probe top-1 (%)", ylim=(max(0, low - 1.5), 100),
           title=f"SimCLR, digits, {res['config']['epochs']} epochs, seeds {res['config']['seeds']}")
    sep = {**res["images"]["separability"], "real vs real": res["images"]["control"]}
    feats = list(res["images"]["control"])
    for i, kind in enumerate(sep):
        bx.barh([j + (i - 1) * 0.27 for j in range(len(feats))], [sep[kind][f] for f in feats], 0.27, label=kind)
    bx.axvline(0.5, ls="--", c="grey", label="chance")
    bx.set_yticks(range(len(feats)), feats, fontsize=8)
    bx.set(xlim=(0.4, 1.0), xlabel="real-vs-synthetic accuracy", title="how easily variations are told apart")
    bx.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    out = output_path(args.out, "bench/digits_gap.py")
    load = LoadWatch()
    real = load_real_images(DataConfig())
    from onlinemix.tinymodel.quality import digits_classifier
    classifier = digits_classifier()
    if args.runs_dir is not None:
        (args.runs_dir / "digits-gap").mkdir(parents=True, exist_ok=True)
    with (nullcontext(args.runs_dir / "digits-gap") if args.runs_dir is not None
          else scratch_dir(Path(tempfile.gettempdir()), ".digits-gap-")) as work:
        caches = {"raw": work / "caches" / "warm"}
        run_checked([sys.executable, "-m", "onlinemix.cache", "warm", "--variations", str(args.variations),
                     "--cache.dir", str(caches["raw"]), "--generator.cpu_threads", str(args.threads)], args.threads)
        derived = {}
        for variant in ("matched", "filtered", "first"):
            if any(ARMS[a][1] == variant for a in args.only):
                caches[variant] = work / "caches" / variant
                derived[variant] = derived_cache(caches["raw"], caches[variant], variant, real, classifier)
        images = measure_images(caches["raw"], real, classifier, args.images)
        arms = {}
        for arm in tqdm(args.only, desc="arms", unit="arm", file=sys.stderr):
            arms[arm] = summarize([train_once(arm, seed, args, caches, work) for seed in args.seeds])
        if "real" in arms:  # the same seed starts from the same backbone: differences per seed are less noisy
            for cell in arms.values():
                diffs = [r["top1"] - b["top1"] for r, b in zip(cell["runs"], arms["real"]["runs"], strict=True)]
                cell["vs_real_mean"] = statistics.fmean(diffs)
                cell["vs_real_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    ran = [r["seconds"] for cell in arms.values() for r in cell["runs"] if r["seconds"] is not None]
    res = {"meta": {**cpu_meta(), "total_run_s": sum(ran), "runs_reused": sum(len(c["runs"]) for c in arms.values())
                    - len(ran), **load.meta(args.quick, "bench/digits_gap.py", argv)},
           "config": {"epochs": args.epochs, "seeds": args.seeds, "variations": args.variations,
                      "threads": args.threads, "method": "simclr", "generator": "digits-tiny"},
           "filtered": derived.get("filtered"), "images": images, "arms": arms}
    save_results(res, out, plot, format_report, _T0, started)
    out.with_suffix(".md").write_text(markdown(res) + "\n")
    return res


if __name__ == "__main__":
    main()
