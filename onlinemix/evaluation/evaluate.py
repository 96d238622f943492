"""The eval command: frozen backbones scored on real images by linear probe and weighted kNN.

``python -m onlinemix.eval CHECKPOINT [CHECKPOINT ...] [--eval-set NAME=PATH ...]`` evaluates
each checkpoint on the held-out split of its run's dataset and on extra evaluation sets, and
writes one results table per checkpoint (Markdown and JSON). Two protocols (``--protocol``), each
row saying which one produced it:

- ``fast``: features computed once, a linear probe and a weighted kNN on them (:mod:`onlinemix.evaluation.probe`);
  the quick monitor, also run by training;
- ``linear``: the paper's linear evaluation, a linear classifier trained on the frozen backbone's features
  of freshly augmented images every epoch (:mod:`onlinemix.evaluation.linear`).

Which images fit the classifiers (or form the kNN bank) depends on the set, as in the MixDiff paper:

- the run's dataset: its training split fits, its held-out split is scored;
- ``NAME=PATH`` where PATH holds ``train/`` and ``val/`` (or ``test/``) sub-splits: a *transfer*
  set (CIFAR, Flowers, ...): its own ``train`` fits, its ``val``/``test`` is scored;
- any other ``NAME=PATH``: a *robustness* set (IN-V2, Sketch, A, R) with the run's classes:
  the run's training split fits, the whole set is scored. Its ImageFolder class names must be
  among the run's (labels are matched by name); webdataset ``cls`` values index the run's classes.

A split is a prepared image store, an ImageFolder directory, one ``.tar`` webdataset shard, a brace pattern of shards or a
directory of shards (samples with an image and an integer ``cls``). What a run directory holds is
read through :mod:`onlinemix.training.rundir`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from onlinemix.core.cli import config_value, run_command
from onlinemix.core.config import ProbeConfig
from onlinemix.core.files import write_json
from onlinemix.data import DataError, Images, LabelledImages, RealImages, load_image_source, load_real_images, subset
from onlinemix.data.store import ImageStore, StoreError, check_resolution, is_image_store
from onlinemix.evaluation.linear import LinearProtocol, fit_linear_classifier, training_view
from onlinemix.evaluation.probe import extract_features, fit_linear_probe, knn_scores, topk_accuracy
from onlinemix.methods.backbones import seeded_backbone
from onlinemix.training.rundir import Checkpoint, load_backbone, resolve_checkpoint
from onlinemix.views.backends import choose_backend

log = logging.getLogger(__name__)

TRANSFER_FIT_SPLIT = "train"
TRANSFER_EVAL_SPLITS = ("val", "test")
PROTOCOLS = {"fast": ("fast",), "linear": ("linear",), "both": ("fast", "linear")}
LINEAR_FLAGS = ("linear_epochs", "linear_lr", "linear_batch_size", "augment_backend")


# ----------------------------------------------------------------------------- evaluation sets

@dataclass
class EvalSet:
    name: str
    split: str                  # which images fit and which are scored
    fit_images: Images          # fit the classifiers / form the kNN bank
    fit_labels: torch.Tensor
    eval_images: Images         # scored
    eval_labels: torch.Tensor
    n_classes: int


def heldout_set(real: RealImages, train_images: Images, dataset: str) -> EvalSet:
    """``train_images``: the run's training split, one object shared with the robustness sets, so that its
    features are extracted (and a linear classifier trained) once."""
    te = real.holdout_ids
    return EvalSet(Path(dataset).name, "held-out split; fit on the run's training split", train_images,
                   real.labels[real.train_ids], subset(real.images, te), real.labels[te], len(real.classes))


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


def extra_set(name: str, path: Path, real: RealImages, train_images: Images, resolution: int) -> EvalSet:
    """A transfer set (own train/val splits) or a robustness set (scored with the run's classifiers, fitted on
    ``train_images``, the run's training split)."""
    splits = transfer_splits(path)
    if splits is None:
        source = _load(name, path, resolution)
        labels = _relabel(source, real.classes, len(real.classes), f"eval set {name} ({path})")
        return EvalSet(name, "robustness; fit on the run's training split", train_images,
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
    """What to run: the fast protocol's probe and kNN settings, and the linear protocol (None = not run)."""
    probe: ProbeConfig | None
    knn_k: int
    knn_temperature: float
    linear: LinearProtocol | None = None

    def describe(self) -> dict[str, str]:
        out = {}
        if self.probe is not None:
            p = self.probe
            out["linear probe"] = (f"fast: multinomial logistic regression on frozen, standardised features (no "
                                   f"augmentation), full batch, Adam lr {p.lr}, weight decay {p.weight_decay}, "
                                   f"{p.epochs} steps, seed 0")
            out["kNN"] = (f"fast: weighted kNN: cosine similarity, k={self.knn_k} nearest, votes exp(sim/T) with "
                          f"T={self.knn_temperature} (Wu et al. 2018, DINO)")
        if self.linear is not None:
            out["linear classifier"] = f"linear: {self.linear.describe()}"
        out["top-5"] = "top-min(5, classes)"
        out["features"] = ("backbone output (before the projector) of uint8 images at the run's resolution (the centre "
                           "crop of larger stored images, except the linear protocol's training views), ImageNet mean/std")
        return out


def evaluate_backbone(backbone: nn.Module, sets: list[EvalSet], settings: Settings, device: torch.device,
                      label: str, resolution: int) -> list[dict]:
    """Rows eval set x protocol x method. Features of an image tensor shared by several sets are extracted
    once, and one linear classifier is trained per set of fitting images. Images larger than the run's
    ``resolution`` (a store's) are centre-cropped to it for scoring."""
    features: dict[int, torch.Tensor] = {}
    classifiers: dict[int, nn.Linear] = {}

    def feats(images: Images, desc: str) -> torch.Tensor:
        if id(images) not in features:
            features[id(images)] = extract_features(backbone, images, device, desc=f"{label}: {desc}",
                                                    resolution=resolution)
        return features[id(images)]

    def classifier(s: EvalSet) -> nn.Linear:
        if id(s.fit_images) not in classifiers:
            classifiers[id(s.fit_images)] = fit_linear_classifier(
                backbone, s.fit_images, s.fit_labels, s.n_classes, settings.linear, device,
                desc=f"{label}: {s.name} linear eval")
        return classifiers[id(s.fit_images)]

    rows = []
    for s in sets:
        eval_x = feats(s.eval_images, s.name)  # the test view of every protocol: the centre crop
        scores = []
        if settings.probe is not None:
            fit_x = feats(s.fit_images, f"{s.name} fit")
            probe = fit_linear_probe(fit_x, s.fit_labels, s.n_classes, settings.probe)
            knn = knn_scores(fit_x, s.fit_labels, eval_x, s.n_classes, settings.knn_k, settings.knn_temperature)
            scores += [("fast", "linear probe", probe(eval_x)), ("fast", "kNN", knn)]
        if settings.linear is not None:
            scores.append(("linear", "linear classifier", classifier(s)(eval_x.to(device)).cpu()))
        for protocol, method, score in scores:
            rows.append({"eval_set": s.name, "split": s.split, "protocol": protocol, "method": method,
                         "backbone": label, "n_fit": len(s.fit_labels), "n_eval": len(s.eval_labels),
                         **topk_accuracy(score, s.eval_labels)})
    return rows


def format_markdown(result: dict) -> str:
    lines = [f"# {result['checkpoint']}", "", f"weights: `{result['weights']}`", "",
             "| eval set | split | protocol | method | backbone | n fit | n eval | top-1 | top-5 |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['eval_set']} | {r['split']} | {r['protocol']} | {r['method']} | {r['backbone']} | {r['n_fit']} | "
              f"{r['n_eval']} | {r['top1']:.2f} | {r['top5']:.2f} |" for r in result["rows"]]
    lines += ["", "Settings:", ""] + [f"- {k}: {v}" for k, v in result["settings"].items()]
    return "\n".join(lines) + "\n"


def evaluate_checkpoint(ckpt: Checkpoint, eval_sets: list[tuple[str, Path]], settings: Settings,
                        device: torch.device, random_init: bool) -> dict:
    real = load_real_images(ckpt.cfg.data, ckpt.cfg.store_root())
    train_images = subset(real.images, real.train_ids)
    sets = [heldout_set(real, train_images, ckpt.cfg.data.dataset)]
    sets += [extra_set(name, path, real, train_images, ckpt.cfg.data.resolution) for name, path in eval_sets]
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
        prog="onlinemix.eval",
        description="Evaluate frozen backbones on real images, top-1/top-5, on the run's held-out split and extra "
                    "evaluation sets, by two protocols: 'fast' (features computed once; linear probe and weighted "
                    "kNN) and 'linear' (the paper's linear evaluation: a linear classifier trained with SGD on "
                    "freshly augmented images every epoch). NAME=PATH with train/ and val/ (or test/) "
                    "sub-splits is a transfer set (fits on its own train split); any other PATH is scored with the "
                    "classes and the training split of the run (robustness sets). A split is an ImageFolder "
                    "directory, a .tar webdataset shard, a brace pattern of shards or a directory of shards.")
    parser.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT",
                        help="a run directory (config.yaml + backbone.safetensors) or a .safetensors backbone file "
                             "next to a config.yaml")
    parser.add_argument("--eval-set", type=parse_eval_set, action="append", default=[], metavar="NAME=PATH",
                        help="an extra evaluation set (repeatable)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="fast",
                        help="'fast' (the quick monitor), 'linear' (the paper's linear evaluation) or 'both' "
                             "(default fast)")
    parser.add_argument("--knn-k", type=config_value("probe.knn_k"), default=20, help="fast: neighbours of the weighted kNN (default 20)")
    parser.add_argument("--knn-temperature", type=config_value("probe.knn_temperature"), default=0.07, help="fast: kNN temperature T (default 0.07)")
    parser.add_argument("--probe-epochs", type=config_value("probe.epochs"), default=None, help="fast: probe optimisation steps (default: the run's probe.epochs)")
    parser.add_argument("--linear-epochs", type=config_value("linear_eval.epochs"), default=None,
                        help="linear: epochs (default: the run's linear_eval.epochs, 100)")
    parser.add_argument("--linear-lr", type=config_value("linear_eval.lr"), default=None,
                        help="linear: SGD learning rate per 256 images (default: the run's linear_eval.lr, 0.1)")
    parser.add_argument("--linear-batch-size", type=config_value("linear_eval.batch_size"), default=None,
                        help="linear: images per step (default: the run's linear_eval.batch_size, 256)")
    parser.add_argument("--augment-backend", type=config_value("train.augment_backend"), default=None,
                        help="linear: what makes the training views, as train.augment_backend: auto, torchvision, torch, "
                             "compiled or triton (default: the run's)")
    parser.add_argument("--random-init", action="store_true", help="also evaluate the run's random-init backbone")
    parser.add_argument("--out", type=Path, default=None, help="write eval/<checkpoint>.md/.json here instead of the run dir")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.eval_set]
    if len(set(names)) != len(names):
        parser.error(f"--eval-set names must be unique, got {names}")
    given = [f"--{flag.replace('_', '-')}" for flag in LINEAR_FLAGS if getattr(args, flag) is not None]
    if given and "linear" not in PROTOCOLS[args.protocol]:
        parser.error(f"{', '.join(given)}: an option of the linear protocol, which --protocol {args.protocol} does "
                     "not run; add --protocol linear or --protocol both")
    if args.probe_epochs is not None and "fast" not in PROTOCOLS[args.protocol]:
        parser.error("--probe-epochs: an option of the fast protocol, which --protocol linear does not run; add "
                     "--protocol both, or leave it out")
    return args


def settings_for(ckpt: Checkpoint, args: argparse.Namespace, device: torch.device) -> Settings:
    """A checkpoint's settings: its run's config, with the flags given on top."""
    protocols = PROTOCOLS[args.protocol]
    probe = replace(ckpt.cfg.probe, epochs=args.probe_epochs or ckpt.cfg.probe.epochs) if "fast" in protocols else None
    linear = None
    if "linear" in protocols:
        given = {"epochs": args.linear_epochs, "lr": args.linear_lr, "batch_size": args.linear_batch_size}
        cfg = replace(ckpt.cfg.linear_eval, **{k: v for k, v in given.items() if v is not None})
        backend, why = choose_backend(args.augment_backend or ckpt.cfg.train.augment_backend, device,
                                     ckpt.cfg.data.resolution)
        log.info("linear eval views: %s backend (%s)", backend, why)
        linear = LinearProtocol(cfg, backend, training_view(ckpt.cfg.data.resolution, ckpt.cfg.data.min_crop_scale))
    return Settings(probe, args.knn_k, args.knn_temperature, linear)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = [resolve_checkpoint(p) for p in args.checkpoints]  # every path checked before any work
    names = [c.name for c in checkpoints]
    if args.out is not None and len(set(names)) != len(names):
        raise ValueError(f"checkpoints {names} would overwrite each other's results under --out {args.out}")
    settings = [settings_for(ckpt, args, device) for ckpt in checkpoints]  # a backend that cannot run stops here
    results = []
    for ckpt, ckpt_settings in zip(checkpoints, settings, strict=True):
        result = evaluate_checkpoint(ckpt, args.eval_set, ckpt_settings, device, args.random_init)
        md, js = write_results(result, (args.out or ckpt.run_dir) / "eval")
        print(format_markdown(result), flush=True)
        log.info("wrote %s and %s", md, js)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
