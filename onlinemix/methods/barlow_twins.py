"""Barlow Twins: the cross-correlation loss between two branches, and its settings (the ``barlowtwins``
section)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onlinemix.core.config import ConfigError, MethodSettings, opt
from onlinemix.methods.base import SSLMethod, StepInfo
from onlinemix.methods.losses import barlow_twins_loss
from onlinemix.views.compose import Views


def projector_sizes(spec: str) -> list[int]:
    """The layer sizes of a '-'-separated projector spec ('8192-8192-8192')."""
    return [int(x) for x in spec.split("-")]


@dataclass
class BarlowTwinsConfig(MethodSettings):
    """train.method 'barlowtwins'."""
    projector: str = opt("128-128", "projector layer sizes, '-'-separated (Linear-BN-ReLU between layers; the "
                         "official ResNet-50 one is 8192-8192-8192)", fixed_on_resume=True)
    lambda_: float = opt(0.0051, "weight lambda of the off-diagonal (redundancy) term", low=0.0, high=100.0)

    def check_consistency(self) -> None:
        try:
            projector_sizes(self.projector)
        except ValueError:
            raise ConfigError(f"barlowtwins.projector={self.projector!r} is not valid: "
                              "expected layer sizes separated by '-', e.g. 8192-8192-8192") from None


class BarlowTwins(SSLMethod):
    """Cross-correlation loss between the two branches' projections (official projector:
    Linear-BN-ReLU blocks, a final Linear without bias; each branch a separate forward, so its
    BatchNorm statistics are its own, as in the official code)."""

    def __init__(self, backbone: nn.Module, cfg: BarlowTwinsConfig) -> None:
        super().__init__(backbone)
        sizes = [backbone.out_dim, *projector_sizes(cfg.projector)]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.lambda_ = cfg.lambda_

    def forward(self, views: Views, info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        view_a, view_b = views.images
        z_a, z_b = self.projector(self.backbone(view_a)), self.projector(self.backbone(view_b))
        return barlow_twins_loss(z_a, z_b, self.lambda_, weights=self.observe_pairs(z_a, z_b)), {}
