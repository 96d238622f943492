"""Probes of frozen features on real images: the maths, and the monitors training runs.

Features of a frozen backbone (:func:`extract_features`) are scored two ways, each as top-1 and
top-5: a linear probe (multinomial logistic regression on standardised features) and a weighted
kNN. The training run uses them on its dataset's held-out split, every few epochs and at the end
(:func:`heldout_knn`, :func:`heldout_linear`, :func:`compare_with_random_init`); the eval command
(:mod:`onlinemix.evaluation.evaluate`) applies the same maths to its evaluation sets. Kept apart from that
command so that training imports no command-line module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import center_crop
from tqdm.auto import tqdm

from onlinemix.core.config import Config, ProbeConfig
from onlinemix.data import Images, RealImages, load_real_images
from onlinemix.methods.backbones import seeded_backbone
from onlinemix.views.recipes import eval_transform

# ----------------------------------------------------------------------------- features and classifiers

@torch.no_grad()
def extract_features(backbone: nn.Module, images: Images, device: torch.device, batch_size: int = 512,
                     desc: str | None = "features", resolution: int | None = None) -> torch.Tensor:
    """Frozen features in eval mode; a progress bar on a terminal unless ``desc`` is None (inside training's own bar).
    Images larger than ``resolution`` (a store's, kept larger for the training crops) are centre-cropped
    to it, the usual evaluation view."""
    was_training = backbone.training
    backbone.eval()
    norm = eval_transform()
    starts = tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False,
                  disable=True if desc is None else None)  # None: only on a terminal, not in logs
    crop = (lambda x: center_crop(x, [resolution, resolution])) if resolution and images.shape[-1] > resolution \
        else (lambda x: x)
    feats = [backbone(norm(crop(images[i:i + batch_size])).to(device)).float().cpu() for i in starts]
    backbone.train(was_training)
    return torch.cat(feats)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 (top-C when there are fewer than 5 classes) in percent."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return {"top1": 100.0 * (top[:, 0] == labels).float().mean().item(),
            "top5": 100.0 * (top == labels[:, None]).any(1).float().mean().item()}


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, n_classes: int, cfg: ProbeConfig,
                     seed: int = 0) -> nn.Module:
    """Multinomial logistic regression on standardised features, full batch, Adam."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    x = (train_x - mean) / std
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        opt.zero_grad()
        F.cross_entropy(head(x), train_y).backward()
        opt.step()
    return Standardised(mean, std, head).requires_grad_(False)


class Standardised(nn.Module):
    """The probe as fitted: the training features' standardisation, then the linear head."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, head: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) / self.std)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 cfg: ProbeConfig, seed: int = 0) -> dict[str, float]:
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    return topk_accuracy(fit_linear_probe(train_x, train_y, n_classes, cfg, seed)(test_x), test_y)


def knn_scores(bank_x: torch.Tensor, bank_y: torch.Tensor, query_x: torch.Tensor, n_classes: int, k: int,
               temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al. 2018, DINO): the k most cosine-similar bank features
    vote for their class with weight exp(similarity / temperature)."""
    bank = F.normalize(bank_x.float(), dim=1)
    bank_y = bank_y.to(torch.int64)
    k = min(k, len(bank))
    out = []
    for i in range(0, len(query_x), chunk):
        sim = F.normalize(query_x[i:i + chunk].float(), dim=1) @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes).scatter_add_(1, bank_y[top_idx], (top_sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


# ----------------------------------------------------------------------------- the training run's probe

def heldout_linear(feats: torch.Tensor, real: RealImages, cfg: ProbeConfig) -> dict[str, float]:
    """Linear probe fitted on the training split's features (of all ``real.images``), scored on the held-out ones."""
    tr, te = real.train_ids, real.holdout_ids
    return linear_probe(feats[tr], real.labels[tr], feats[te], real.labels[te], cfg)


def heldout_knn(feats: torch.Tensor, real: RealImages, cfg: ProbeConfig) -> dict[str, float]:
    """Weighted kNN of the held-out features against the training split's: no fitting, so cheap
    enough to watch the features improve during training."""
    tr, te = real.train_ids, real.holdout_ids
    n_classes = int(real.labels.max()) + 1
    scores = knn_scores(feats[tr], real.labels[tr], feats[te], n_classes, cfg.knn_k, cfg.knn_temperature)
    return topk_accuracy(scores, real.labels[te])


def probe_backbone(backbone: nn.Module, real: RealImages, cfg: ProbeConfig, device: torch.device,
                   resolution: int) -> dict[str, float]:
    """Fit on the training split's real images, report on the held-out real images."""
    return heldout_linear(extract_features(backbone, real.images, device, resolution=resolution), real, cfg)


def compare_with_random_init(backbone: nn.Module, cfg: Config, device: torch.device,
                             real: RealImages | None = None) -> dict[str, dict[str, float]]:
    real = real if real is not None else load_real_images(cfg.data, cfg.store_root())
    r = cfg.data.resolution
    return {"trained": probe_backbone(backbone, real, cfg.probe, device, r),
            "random_init": probe_backbone(seeded_backbone(cfg.train).to(device), real, cfg.probe, device, r)}


def format_probe(results: dict[str, dict[str, float]]) -> str:
    lines = ["linear probe on held-out real images", f"  {'backbone':<12} {'top-1':>7} {'top-5':>7}"]
    for name, r in results.items():
        lines.append(f"  {name:<12} {r['top1']:>6.2f}% {r['top5']:>6.2f}%")
    return "\n".join(lines)
