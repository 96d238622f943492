"""The eval command: frozen backbones scored on real images by linear probe and weighted kNN.

``python -m onlinemix.eval CHECKPOINT [CHECKPOINT ...] [--eval-set NAME=PATH ...]`` evaluates
each checkpoint on the held-out split of its run's dataset and on extra evaluation sets, and
writes one results table per checkpoint (Markdown and JSON). Which images fit the probe (or
form the kNN bank) depends on the set, as in the MixDiff paper's protocols:

- the run's dataset: its training split fits, its held-out split is scored;
- ``NAME=PATH`` where PATH holds ``train/`` and ``val/`` (or ``test/``) sub-splits: a *transfer*
  set (CIFAR, Flowers, ...): its own ``train`` fits, its ``val``/``test`` is scored;
- any other ``NAME=PATH``: a *robustness* set (IN-V2, Sketch, A, R) with the run's classes:
  the run's training split fits, the whole set is scored. Its ImageFolder class names must be
  among the run's (labels are matched by name); webdataset ``cls`` values index the run's classes.

A split is a prepared image store, an ImageFolder directory, one ``.tar`` webdataset shard, a brace pattern of shards or a
directory of shards (samples with an image and an integer ``cls``). The probe maths lives in
:mod:`onlinemix.probe`, what a run directory holds in :mod:`onlinemix.rundir`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .cli import config_value, run_command
from .config import ProbeConfig
from .data import DataError, Images, LabelledImages, RealImages, load_image_source, load_real_images, subset
from .data.store import ImageStore, StoreError, check_resolution, is_image_store
from .files import write_json
from .models import seeded_backbone
from .probe import extract_features, fit_linear_probe, knn_scores, topk_accuracy
from .rundir import Checkpoint, load_backbone, resolve_checkpoint

log = logging.getLogger(__name__)

TRANSFER_FIT_SPLIT = "train"
TRANSFER_EVAL_SPLITS = ("val", "test")


# ----------------------------------------------------------------------------- evaluation sets

@dataclass
class EvalSet:
    name: str
    protocol: str
    fit_images: Images          # fit the probe / form the kNN bank
    fit_labels: torch.Tensor
    eval_images: Images         # scored
    eval_labels: torch.Tensor
    n_classes: int


def heldout_set(real: RealImages, dataset: str) -> EvalSet:
    tr, te = real.train_ids, real.holdout_ids
    return EvalSet(Path(dataset).name, "held-out split; fit on the run's training split", subset(real.images, tr),
                   real.labels[tr], subset(real.images, te), real.labels[te], len(real.classes))


def _relabel(source: LabelledImages, classes: list[str] | None, n_classes: int, what: str) -> torch.Tensor:
    """The source's labels in the target's class indices: by class name when both have names."""
    if source.classes is not None and classes is not None:
        unknown = sorted(set(source.classes) - set(classes))
        if unknown:
            raise DataError(f"class mismatch: {what} has classes {unknown[:10]} that are not among "
                            f"{len(classes)} classes {classes[:10]}{'...' if len(classes) > 10 else ''}")
        index = torch.tensor([classes.index(c) for c in source.classes], dtype=torch.int64)
        return index[source.labels]
    bad = source.labels[(source.labels < 0) | (source.labels >= n_classes)]
    if len(bad):
        raise DataError(f"class mismatch: {what} has label {int(bad[0])}, outside the {n_classes} classes 0..{n_classes - 1}")
    return source.labels


def transfer_splits(path: Path) -> tuple[Path, Path] | None:
    """(train, val-or-test) when PATH holds both sub-splits, else None."""
    fit = path / TRANSFER_FIT_SPLIT
    evals = [path / s for s in TRANSFER_EVAL_SPLITS if (path / s).exists()]
    return (fit, evals[0]) if fit.exists() and evals else None


def _load(name: str, path: Path, resolution: int) -> LabelledImages:
    """A split: a prepared image store (read by id as features are extracted, never held whole), or
    a small set decoded into memory."""
    try:
        if is_image_store(path):
            store = ImageStore.open(path)
            check_resolution(store, resolution)
            return LabelledImages(store, store.labels, store.classes)
        return load_image_source(path, resolution)
    except (DataError, StoreError) as e:
        raise DataError(f"eval set {name}: {e}") from e


def extra_set(name: str, path: Path, real: RealImages, resolution: int) -> EvalSet:
    """A transfer set (own train/val splits) or a robustness set (scored with the run's probe)."""
    splits = transfer_splits(path)
    if splits is None:
        source = _load(name, path, resolution)
        labels = _relabel(source, real.classes, len(real.classes), f"eval set {name} ({path})")
        return EvalSet(name, "robustness; fit on the run's training split", subset(real.images, real.train_ids),
                       real.labels[real.train_ids], source.images, labels, len(real.classes))
    fit, ev = (_load(name, p, resolution) for p in splits)
    n_classes = len(fit.classes) if fit.classes is not None else int(fit.labels.max()) + 1
    labels = _relabel(ev, fit.classes, n_classes, f"eval set {name} split {splits[1].name}")
    return EvalSet(name, f"transfer; fit on its {splits[0].name} split, scored on {splits[1].name}", fit.images,
                   fit.labels, ev.images, labels, n_classes)


def parse_eval_set(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--eval-set {text!r}: expected NAME=PATH")
    return name, Path(path)


# ----------------------------------------------------------------------------- evaluation

@dataclass
class Settings:
    probe: ProbeConfig
    knn_k: int
    knn_temperature: float

    def describe(self) -> dict[str, str]:
        p = self.probe
        return {"linear probe": f"multinomial logistic regression on frozen, standardised features (no augmentation), "
                                f"full batch, Adam lr {p.lr}, weight decay {p.weight_decay}, {p.epochs} steps, seed 0",
                "kNN": f"weighted kNN: cosine similarity, k={self.knn_k} nearest, votes exp(sim/T) with "
                       f"T={self.knn_temperature} (Wu et al. 2018, DINO)",
                "top-5": "top-min(5, classes)",
                "features": "backbone output (before the projector) of uint8 images at the run's resolution, "
                            "ImageNet mean/std"}


def evaluate_backbone(backbone: nn.Module, sets: list[EvalSet], settings: Settings, device: torch.device,
                      label: str, resolution: int) -> list[dict]:
    """Rows eval set x method; features of an image tensor shared by several sets are extracted once.
    Images larger than the run's ``resolution`` (a store's) are centre-cropped to it."""
    cache: dict[int, torch.Tensor] = {}

    def feats(images: Images, desc: str) -> torch.Tensor:
        if id(images) not in cache:
            cache[id(images)] = extract_features(backbone, images, device, desc=f"{label}: {desc}",
                                                 resolution=resolution)
        return cache[id(images)]

    rows = []
    for s in sets:
        fit_x, eval_x = feats(s.fit_images, f"{s.name} fit"), feats(s.eval_images, s.name)
        probe = fit_linear_probe(fit_x, s.fit_labels, s.n_classes, settings.probe)
        knn = knn_scores(fit_x, s.fit_labels, eval_x, s.n_classes, settings.knn_k, settings.knn_temperature)
        for method, scores in (("linear probe", probe(eval_x)), ("kNN", knn)):
            rows.append({"eval_set": s.name, "protocol": s.protocol, "method": method, "backbone": label,
                         "n_fit": len(fit_x), "n_eval": len(eval_x), **topk_accuracy(scores, s.eval_labels)})
    return rows


def format_markdown(result: dict) -> str:
    lines = [f"# {result['checkpoint']}", "", f"weights: `{result['weights']}`", "",
             "| eval set | protocol | method | backbone | n fit | n eval | top-1 | top-5 |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['eval_set']} | {r['protocol']} | {r['method']} | {r['backbone']} | {r['n_fit']} | "
              f"{r['n_eval']} | {r['top1']:.2f} | {r['top5']:.2f} |" for r in result["rows"]]
    lines += ["", "Settings:", ""] + [f"- {k}: {v}" for k, v in result["settings"].items()]
    return "\n".join(lines) + "\n"


def evaluate_checkpoint(ckpt: Checkpoint, eval_sets: list[tuple[str, Path]], settings: Settings,
                        device: torch.device, random_init: bool) -> dict:
    real = load_real_images(ckpt.cfg.data, ckpt.cfg.store_root())
    sets = [heldout_set(real, ckpt.cfg.data.dataset)]
    sets += [extra_set(name, path, real, ckpt.cfg.data.resolution) for name, path in eval_sets]
    backbones = [("trained", load_backbone(ckpt.run_dir, ckpt.cfg, ckpt.weights))]
    if random_init:
        backbones.append(("random_init", seeded_backbone(ckpt.cfg.train)))
    rows = [row for label, net in backbones
            for row in evaluate_backbone(net.to(device), sets, settings, device, label, ckpt.cfg.data.resolution)]
    return {"checkpoint": ckpt.name, "weights": str(ckpt.weights), "backbone_arch": ckpt.cfg.train.backbone,
            "settings": settings.describe(), "rows": rows}


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{result['checkpoint']}.md", out_dir / f"{result['checkpoint']}.json"
    md.write_text(format_markdown(result))
    write_json(js, result)
    return md, js


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate frozen backbones on real images: linear probe and weighted kNN, top-1/top-5, on the "
                    "run's held-out split and extra evaluation sets. NAME=PATH with train/ and val/ (or test/) "
                    "sub-splits is a transfer set (fits on its own train split); any other PATH is scored with the "
                    "classes and the training split of the run (robustness sets). A split is an ImageFolder "
                    "directory, a .tar webdataset shard, a brace pattern of shards or a directory of shards.")
    parser.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT",
                        help="a run directory (config.yaml + backbone.safetensors) or a .safetensors backbone file "
                             "next to a config.yaml")
    parser.add_argument("--eval-set", type=parse_eval_set, action="append", default=[], metavar="NAME=PATH",
                        help="an extra evaluation set (repeatable)")
    parser.add_argument("--knn-k", type=config_value("probe.knn_k"), default=20, help="neighbours of the weighted kNN (default 20)")
    parser.add_argument("--knn-temperature", type=config_value("probe.knn_temperature"), default=0.07, help="kNN temperature T (default 0.07)")
    parser.add_argument("--probe-epochs", type=config_value("probe.epochs"), default=None, help="probe optimisation steps (default: the run's probe.epochs)")
    parser.add_argument("--random-init", action="store_true", help="also evaluate the run's random-init backbone")
    parser.add_argument("--out", type=Path, default=None, help="write eval/<checkpoint>.md/.json here instead of the run dir")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.eval_set]
    if len(set(names)) != len(names):
        parser.error(f"--eval-set names must be unique, got {names}")
    return args


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = [resolve_checkpoint(p) for p in args.checkpoints]  # every path checked before any work
    names = [c.name for c in checkpoints]
    if args.out is not None and len(set(names)) != len(names):
        raise ValueError(f"checkpoints {names} would overwrite each other's results under --out {args.out}")
    results = []
    for ckpt in checkpoints:
        probe = replace(ckpt.cfg.probe, epochs=args.probe_epochs or ckpt.cfg.probe.epochs)
        result = evaluate_checkpoint(ckpt, args.eval_set, Settings(probe, args.knn_k, args.knn_temperature),
                                     device, args.random_init)
        md, js = write_results(result, (args.out or ckpt.run_dir) / "eval")
        print(format_markdown(result), flush=True)
        log.info("wrote %s and %s", md, js)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
