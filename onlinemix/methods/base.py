"""What every method shares: the interface the trainer drives and where training stands.

A method is an ``nn.Module`` holding the backbone (attribute ``backbone``, what the probe and
``backbone.safetensors`` use) and its heads, and names the views its loss takes (``view_plan``;
onlinemix/views/compose.py composes them). The trainer calls, per step:

    views = composer(batch.images, epoch, step)         # onlinemix/views/compose.py: uint8 images -> float views
    loss, logs = model(views.to(device), info)          # forward through the accelerate-prepared module
    backward; [clip]; method.after_backward(info); optimizer.step(); method.after_step(info)

Each forward also leaves ``pair_similarity``: per row, the cosine similarity of the embeddings of its two
branches (real and synthetic under MixDiff), detached. It is the trainers' cheap signal of how well the
model matches each pair, which aims generation (onlinemix/exchange/aim.py) and, with
``train.pair_weighting``, weighs the pairs' terms of the loss (:func:`pair_weights`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from onlinemix.views.compose import TwoViews, ViewPlan, Views


class StepInfo(NamedTuple):
    """Where training stands; ``step`` is the index of the step being taken (0-based)."""
    step: int
    epoch: int
    total_steps: int


def pair_weights(similarity: torch.Tensor) -> torch.Tensor:
    """Loss weights of a batch's pairs from their similarity: (1 + cosine) / 2 in [0, 1], scaled to mean 1,
    so a pair whose two views the model finds unrelated (a variation that lost its image) counts less,
    and the loss keeps its scale."""
    weights = (1 + similarity.float()) / 2
    return weights / weights.mean().clamp_min(1e-6)


class SSLMethod(nn.Module):
    """Shared base: the backbone, the views the loss takes, the pair signal and no-op hooks."""

    view_plan: ViewPlan = TwoViews()

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.weigh_pairs = False  # train.pair_weighting (build_method sets it)
        self.pair_similarity: torch.Tensor | None = None  # (B,), detached: see the module docstring

    def observe_pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """Record each row's cosine similarity between two (B, D) embeddings of its branches; returns the
        rows' loss weights under ``train.pair_weighting``, else None."""
        self.pair_similarity = F.cosine_similarity(a.detach().float(), b.detach().float(), dim=1)
        return pair_weights(self.pair_similarity) if self.weigh_pairs else None

    def forward(self, views: Views, info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_backward(self, info: StepInfo) -> None:
        """Between backward (and clipping) and the optimizer step."""

    def after_step(self, info: StepInfo) -> None:
        """After the optimizer step."""

    def outside_modules(self) -> list[nn.Module]:
        """Modules that are not children (no DDP, no optimizer) but belong in checkpoints and on the device."""
        return []
