"""What every method shares: the interface the trainer drives and where training stands.

A method is an ``nn.Module`` holding the backbone (attribute ``backbone``, what the probe and
``backbone.safetensors`` use) and its heads, and names the views its loss takes (``view_plan``;
onlinemix/views/compose.py composes them). The trainer calls, per step:

    views = composer(batch.images, epoch, step)         # onlinemix/views/compose.py: uint8 images -> float views
    loss, logs = model(views.to(device), info)          # forward through the accelerate-prepared module
    backward; [clip]; method.after_backward(info); optimizer.step(); method.after_step(info)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from onlinemix.views.compose import TwoViews, ViewPlan, Views


class StepInfo(NamedTuple):
    """Where training stands; ``step`` is the index of the step being taken (0-based)."""
    step: int
    epoch: int
    total_steps: int


class SSLMethod(nn.Module):
    """Shared base: the backbone, the views the loss takes and no-op hooks."""

    view_plan: ViewPlan = TwoViews()

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, views: Views, info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_backward(self, info: StepInfo) -> None:
        """Between backward (and clipping) and the optimizer step."""

    def after_step(self, info: StepInfo) -> None:
        """After the optimizer step."""

    def outside_modules(self) -> list[nn.Module]:
        """Modules that are not children (no DDP, no optimizer) but belong in checkpoints and on the device."""
        return []
