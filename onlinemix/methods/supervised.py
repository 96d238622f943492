"""The paper's supervised baseline as a method: a linear classifier on the backbone trained with
cross-entropy on the real images' labels (the views carry them), on real, synthetic or mixed views
as the pairing gives them. A method, not a pairing; it has no settings of its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onlinemix.methods.base import SSLMethod, StepInfo
from onlinemix.views.compose import ClassifierViews, Views


class Supervised(SSLMethod):
    """Linear classifier on the backbone, cross-entropy on the real images' labels."""

    view_plan = ClassifierViews()

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__(backbone)
        self.classifier = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, views: Views, info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        """One or two views per sample (an image and its variation), each with the real image's label."""
        logits = self.classifier(self.backbone(torch.cat(views.images)))
        targets = views.labels.repeat(len(views.images))
        accuracy = (logits.argmax(1) == targets).float().mean().item()
        return F.cross_entropy(logits, targets), {"train_top1": 100.0 * accuracy}
