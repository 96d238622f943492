"""How good a variation model's variations of the digits are, on held-out digits it never saw.

- *class kept*: a classifier trained on the real training digits and mild augmentations of them
  labels each variation; its accuracy against the source image's class says whether a variation
  is still the same digit. Trained on the un-augmented digits alone, it labelled only 71-76% of
  mildly augmented held-out digits right (98% of the digits themselves): it judged where the ink
  is, not which digit it draws, and so counted a digit drawn a pixel off as another one;
- *not copies*: the pixel distance (RMS on [0, 1]) and the feature distance (the diversity of
  ``python -m onlinemix.stats``: 1 - cos of the classifier's hidden features) from each source to
  its variation, next to the same distances between two mild augmentations of the source (shift,
  rotation, scale), which count as copies;
- *seeds differ*: the same distances between two variations of one image made with two seeds;
- per guidance scale, those distances and the Frechet distance between the real and generated
  features (the MixDiff paper's Figure 7);
- for a model trained here (its directory holds ``training.json``), the same accuracy and distances
  for the held-out digits themselves drawn as its training targets were (random affine maps): what
  a model that drew real digits exactly as it was taught would score.

Variations are generated at the digits' native 8 x 8 (``generator.resolution``), as the default
run makes them with digits-tiny.

The classifier sees the digits at their native 8 x 8 (images area-downsampled), where a small MLP
reaches about 97% on real held-out digits, and on mild augmentations of them, in seconds of training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from onlinemix.core.config import DataConfig, GeneratorConfig
from onlinemix.data import load_real_images
from onlinemix.data.decode import load_digits
from onlinemix.generation.generator import model_location
from onlinemix.tinymodel.model import NATIVE_SIZE
from onlinemix.tinymodel.train import TrainSettings, digit_blocks, draw_targets
from onlinemix.tools.stats import frechet_distance, mean_cosine_distance, variations_for

HIDDEN = 256
AUGMENTED_COPIES = 4  # mild augmentations of each training digit the classifier learns from, besides the digit


def native_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> grey [0, 1] pixels at the digits' native size, flattened (B, 64)."""
    grey = images.float().mean(dim=1, keepdim=True) / 255.0
    return F.interpolate(grey, size=(NATIVE_SIZE, NATIVE_SIZE), mode="area").flatten(1)


def mild_augmentations(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image shifted (up to 10%), rotated (up to 10 degrees) and scaled (0.9-1.1): still a copy."""
    augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([augment(img) for img in images])


@dataclass
class DigitClassifier:
    """An MLP on native pixels: ``hidden`` gives the features, ``head`` the class scores."""
    hidden: nn.Module
    head: nn.Module

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden(native_pixels(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).argmax(dim=1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images) == labels).float().mean())


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, steps: int = 500,
                     augmented_copies: int = AUGMENTED_COPIES) -> DigitClassifier:
    """Full-batch AdamW with weight decay on the real training digits and ``augmented_copies`` mild
    augmentations of each (seeds apart from those of the measurement's augmentations, 0 to 2); seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden = nn.Sequential(nn.Linear(NATIVE_SIZE ** 2, HIDDEN), nn.ReLU())
        head = nn.Linear(HIDDEN, int(labels.max()) + 1)
    copies = [mild_augmentations(images, seed + 3 + i) for i in range(augmented_copies)]
    x = native_pixels(torch.cat([images, *copies]))
    labels = labels.repeat(1 + augmented_copies)
    opt = torch.optim.AdamW([*hidden.parameters(), *head.parameters()], lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head(hidden(x)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return DigitClassifier(hidden.eval(), head.eval())


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the RMS difference of uint8 images, on [0, 1]."""
    diff = (a.float() - b.float()) / 255.0
    return float(diff.pow(2).flatten(1).mean(dim=1).sqrt().mean())


def distances(classifier: DigitClassifier, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    return {"pixel": pixel_distance(a, b),
            "feature": mean_cosine_distance(classifier.features(a), classifier.features(b))}


def drawn_as_trained(model: str, ids: torch.Tensor, size: int) -> torch.Tensor | None:
    """The digits ``ids`` drawn by the target augmentation of ``model``'s training (seed 0), as uint8
    images of ``size`` resized as the generator resizes its output; None for a model not trained here."""
    training_log = Path(model_location(model)) / "training.json"
    if not training_log.is_file():
        return None
    settings = TrainSettings(**json.loads(training_log.read_text())["settings"])
    native, _, _ = load_digits(NATIVE_SIZE)
    drawn = (draw_targets(digit_blocks(native[ids]), settings, torch.Generator().manual_seed(0)) + 1) / 2
    drawn = F.interpolate(drawn, size=(size, size), mode="bilinear", antialias=True)
    return (drawn.clamp(0, 1) * 255).round().to(torch.uint8)


def digits_classifier() -> DigitClassifier:
    """The classifier ``measure`` judges variations by, trained on the real training digits (seeded)."""
    real = load_real_images(DataConfig())
    return train_classifier(real.images[real.train_ids], real.labels[real.train_ids])


def measure(gen_cfg: GeneratorConfig, scales: list[float], num_images: int, seed_guidance: float = 3.0,
            classifier: DigitClassifier | None = None) -> dict:
    """Every measurement of the module docstring, on the first ``num_images`` held-out digits at the
    default run's resolution; variations seeded by (generator.seed, image id), a second set by seed + 1.
    ``classifier``: :func:`digits_classifier`'s, trained here when not given (it is the same every time)."""
    gen_cfg = replace(gen_cfg, resolution=NATIVE_SIZE)
    real = load_real_images(DataConfig())
    device = torch.device("cpu")
    classifier = classifier or digits_classifier()
    ids = real.holdout_ids[:num_images]
    images, labels = real.images[ids], real.labels[ids]
    real_features = classifier.features(images)
    rows = []
    for k in scales:
        variations = variations_for(images, ids, gen_cfg, k, device)
        features = classifier.features(variations)
        rows.append({"guidance": k, "accuracy": classifier.accuracy(variations, labels),
                     "pixel": pixel_distance(images, variations),
                     "diversity": mean_cosine_distance(real_features, features),
                     "frechet_distance": frechet_distance(real_features, features)})
    first = variations_for(images, ids, gen_cfg, seed_guidance, device)
    second = variations_for(images, ids, replace(gen_cfg, seed=gen_cfg.seed + 1), seed_guidance, device)
    half = len(ids) // 2
    drawn = drawn_as_trained(gen_cfg.model, ids, images.shape[-1])
    trained_targets = None if drawn is None else {
        "accuracy": classifier.accuracy(drawn, labels), **distances(classifier, images, drawn),
        "frechet_distance": frechet_distance(real_features, classifier.features(drawn))}
    return {"model": gen_cfg.model, "num_images": len(ids), "steps": gen_cfg.steps, "scheduler": gen_cfg.scheduler,
            "classifier_accuracy_real": classifier.accuracy(images, labels),
            "classifier_accuracy_augmented": classifier.accuracy(mild_augmentations(images, 2), labels),
            "augmentations": distances(classifier, mild_augmentations(images, 0), mild_augmentations(images, 1)),
            "seeds": {"guidance": seed_guidance, **distances(classifier, first, second)},
            "drawn_as_trained": trained_targets,
            "frechet_distance_real_halves": frechet_distance(real_features[:half], real_features[half:2 * half]),
            "scales": rows}


def format_quality(result: dict) -> str:
    aug, seeds = result["augmentations"], result["seeds"]
    lines = [f"{result['model']}: {result['num_images']} held-out digits, {result['steps']} {result['scheduler']} steps; "
             f"classifier on real held-out digits: {result['classifier_accuracy_real']:.1%}, "
             f"on mild augmentations of them: {result['classifier_accuracy_augmented']:.1%}",
             "  variation vs its source:",
             f"  {'k':>5} {'accuracy':>9} {'pixel':>7} {'diversity':>10} {'Frechet':>8}"]
    lines += [f"  {r['guidance']:>5g} {r['accuracy']:>9.1%} {r['pixel']:>7.4f} {r['diversity']:>10.4f} "
              f"{r['frechet_distance']:>8.3f}" for r in result["scales"]]
    lines.append(f"  two mild augmentations of a source:      pixel {aug['pixel']:.4f}  diversity {aug['feature']:.4f}")
    lines.append(f"  two seeds' variations (k={seeds['guidance']:g}):           pixel {seeds['pixel']:.4f}  "
                 f"diversity {seeds['feature']:.4f}")
    if (drawn := result["drawn_as_trained"]) is not None:
        lines.append(f"  the source drawn as the training's targets: accuracy {drawn['accuracy']:.1%}  "
                     f"pixel {drawn['pixel']:.4f}  diversity {drawn['feature']:.4f}  "
                     f"Frechet {drawn['frechet_distance']:.3f}")
    lines.append(f"  real vs real (two halves): Frechet {result['frechet_distance_real_halves']:.3f}")
    return "\n".join(lines)
