"""Linear-probe evaluation on real images with frozen features.

``python -m onlinemix.eval RUN_DIR`` probes a finished run's backbone next to the same
architecture at its random initialisation (the run's own starting point).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .augment import eval_transform
from .config import Config, ProbeConfig, load_config
from .data import RealImages, load_real_images
from .models import SSLModel, build_backbone

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.safetensors"


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    was_training = backbone.training
    backbone.eval()
    norm = eval_transform()
    feats = [backbone(norm(images[i:i + batch_size]).to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    backbone.train(was_training)
    return torch.cat(feats)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 cfg: ProbeConfig, seed: int = 0) -> dict[str, float]:
    """Multinomial logistic regression on standardised features, full batch, Adam."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        opt.zero_grad()
        F.cross_entropy(head(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        logits = head(test_x)
        top1 = (logits.argmax(1) == test_y).float().mean().item()
        k = min(5, n_classes)
        top5 = (logits.topk(k, dim=1).indices == test_y[:, None]).any(1).float().mean().item()
    return {"top1": 100.0 * top1, "top5": 100.0 * top5}


def probe_backbone(backbone: nn.Module, real: RealImages, cfg: ProbeConfig, device: torch.device) -> dict[str, float]:
    """Fit on the training split's real images, report on the held-out real images."""
    feats = extract_features(backbone, real.images, device)
    tr, te = real.train_ids, real.holdout_ids
    return linear_probe(feats[tr], real.labels[tr], feats[te], real.labels[te], cfg)


def random_init_backbone(cfg: Config) -> nn.Module:
    """The backbone exactly as a run with this config starts, before any training."""
    torch.manual_seed(cfg.train.seed)  # seeded exactly as training seeds it, hence the same weights
    return SSLModel(cfg.train).backbone


def compare_with_random_init(backbone: nn.Module, cfg: Config, device: torch.device,
                             real: RealImages | None = None) -> dict[str, dict[str, float]]:
    real = real if real is not None else load_real_images(cfg.data)
    return {"trained": probe_backbone(backbone, real, cfg.probe, device),
            "random_init": probe_backbone(random_init_backbone(cfg).to(device), real, cfg.probe, device)}


def format_probe(results: dict[str, dict[str, float]]) -> str:
    lines = ["linear probe on held-out real images", f"  {'backbone':<12} {'top-1':>7} {'top-5':>7}"]
    for name, r in results.items():
        lines.append(f"  {name:<12} {r['top1']:>6.2f}% {r['top5']:>6.2f}%")
    return "\n".join(lines)


def load_backbone(run_dir: Path, cfg: Config) -> nn.Module:
    path = run_dir / BACKBONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a finished onlinemix run?")
    backbone = build_backbone(cfg.train)
    backbone.load_state_dict(load_file(path))
    return backbone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Linear probe of a finished run's backbone on real images, "
                                     "next to the same backbone at its random initialisation.")
    parser.add_argument("run_dir", type=Path, help="a run directory written by onlinemix.train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.run_dir / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = compare_with_random_init(load_backbone(args.run_dir, cfg).to(device), cfg, device)
    print(format_probe(results))
    (args.run_dir / "probe.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
