"""Backbones and projection heads."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from onlinemix.core.config import TrainConfig


class TinyCNN(nn.Module):
    """Four conv blocks and global pooling: small enough to train on a CPU in minutes."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(3, width, 1), block(width, 2 * width, 2),
                                      block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_backbone(cfg: TrainConfig) -> nn.Module:
    """A backbone with an ``out_dim`` attribute: the size of the features the probe sees."""
    if cfg.backbone == "tinycnn":
        return TinyCNN(cfg.width)
    net = getattr(torchvision.models, cfg.backbone)(weights=None)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def seeded_backbone(cfg: TrainConfig) -> nn.Module:
    """The backbone exactly as a run with this config starts: the global RNG seeded with
    ``cfg.seed``, then the backbone built first (a method's heads come after, from the same stream)."""
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg)


def simclr_projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR's projection head: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                         nn.Linear(in_dim, out_dim))

