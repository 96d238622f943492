"""SimCLR: NT-Xent between the projections of two views, and its settings (the ``simclr`` section)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onlinemix.core.config import MethodSettings, opt
from onlinemix.methods.backbones import simclr_projector
from onlinemix.methods.base import SSLMethod, StepInfo
from onlinemix.methods.losses import nt_xent
from onlinemix.views.compose import Views


@dataclass
class SimCLRConfig(MethodSettings):
    """train.method 'simclr'."""
    proj_dim: int = opt(64, "output size of SimCLR's projection head (Linear-BN-ReLU-Linear, hidden = backbone "
                        "features)", low=2, high=65536, fixed_on_resume=True)
    temperature: float = opt(0.2, "NT-Xent temperature tau", low=1e-4, high=10.0)


class SimCLR(SSLMethod):
    """NT-Xent between the two views' projections, negatives gathered across ranks."""

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig) -> None:
        super().__init__(backbone)
        self.projector = simclr_projector(backbone.out_dim, cfg.proj_dim)
        self.temperature = cfg.temperature

    def forward(self, views: Views, info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        view_a, view_b = views.images
        z_a, z_b = self.projector(self.backbone(torch.cat([view_a, view_b]))).chunk(2)
        return nt_xent(z_a, z_b, self.temperature, weights=self.observe_pairs(z_a, z_b)), {}
