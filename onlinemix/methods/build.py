"""Training methods behind one interface: backbone + head + loss.

A method is an ``nn.Module`` holding the backbone (attribute ``backbone``, what the probe and
``backbone.safetensors`` use) and its heads, and names the views its loss takes (``view_plan``;
onlinemix/views/compose.py composes them). The trainer calls, per step:

    views = composer(batch.images, epoch, step)         # onlinemix/views/compose.py: uint8 images -> float views
    loss, logs = model(views.to(device), info)          # forward through the accelerate-prepared module
    backward; [clip]; method.after_backward(info); optimizer.step(); method.after_step(info)

``supervised`` is a method, not a pairing: a linear classifier on the backbone trained with
cross-entropy on the real images' labels (the views carry them): the paper's supervised baselines
on real, synthetic and mixed data.

DINO's teacher is an EMA copy of the student kept *outside* the module's registered children:
it is not wrapped by DDP, not seen by the optimizer and not in ``model.safetensors``; the trainer
moves it to the device and registers it with ``accelerator.register_for_checkpointing``
(``outside_modules``), so checkpoints carry it (``custom_checkpoint_0.pkl``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from onlinemix.core.config import BarlowTwinsConfig, Config, DINOConfig, SimCLRConfig
from onlinemix.core.registry import METHODS
from onlinemix.methods.backbones import seeded_backbone, simclr_projector
from onlinemix.methods.dino import (
    DINOCenter,
    DINOHead,
    cancel_last_layer_gradients,
    dino_loss,
    ema_update,
    make_teacher,
    momentum_at,
    teacher_temperature,
)
from onlinemix.methods.losses import barlow_twins_loss, nt_xent
from onlinemix.views.compose import ClassifierViews, MultiCrops, TwoViews, ViewPlan, Views


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


class SimCLR(SSLMethod):
    """NT-Xent between the two views' projections, negatives gathered across ranks."""

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig) -> None:
        super().__init__(backbone)
        self.projector = simclr_projector(backbone.out_dim, cfg.proj_dim)
        self.temperature = cfg.temperature

    def forward(self, views: Views, info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        view_a, view_b = views.images
        z_a, z_b = self.projector(self.backbone(torch.cat([view_a, view_b]))).chunk(2)
        return nt_xent(z_a, z_b, self.temperature), {}


def projector_sizes(spec: str) -> list[int]:
    return [int(x) for x in spec.split("-")]


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
        return barlow_twins_loss(z_a, z_b, self.lambda_), {}


class DINOTeacher(nn.Module):
    """The EMA teacher (backbone + head) and the center of its outputs: one checkpointable object."""

    def __init__(self, student: nn.ModuleDict, out_dim: int, center_momentum: float) -> None:
        super().__init__()
        self.net = make_teacher(student)
        self.center = DINOCenter(out_dim, center_momentum)


def _multi_forward(backbone: nn.Module, head: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Head outputs per view; consecutive views of one size go through the backbone together."""
    out, i = [], 0
    while i < len(views):
        j = i
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        out += list(head(backbone(torch.cat(views[i:j]))).chunk(j - i))
        i = j
    return out


class DINO(SSLMethod):
    """Self-distillation with an EMA teacher on the two global views, multi-crop for the student."""

    def __init__(self, backbone: nn.Module, cfg: DINOConfig) -> None:
        super().__init__(backbone)
        self.cfg = cfg
        self.head = DINOHead(backbone.out_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, num_layers=3,
                             use_bn=cfg.use_bn, norm_last_layer=cfg.norm_last_layer)
        self.view_plan = MultiCrops(cfg.global_crop_min, cfg.local_crops)
        # Bypass nn.Module.__setattr__: the teacher must not be a child (see the module docstring).
        object.__setattr__(self, "teacher", DINOTeacher(self.student(), cfg.out_dim, cfg.center_momentum))
        self._teacher_out: list[torch.Tensor] = []

    def student(self) -> nn.ModuleDict:
        """The student's networks, in the teacher's layout (no copy)."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def outside_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def forward(self, views: Views, info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        """The student on every crop, the teacher on the global ones."""
        cfg = self.cfg
        student_out = _multi_forward(self.backbone, self.head, views.images)
        with torch.no_grad():
            teacher_out = _multi_forward(self.teacher.net["backbone"], self.teacher.net["head"],
                                         views.images[:views.n_global])
        temp = teacher_temperature(info.epoch, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                   cfg.warmup_teacher_temp_epochs)
        loss = dino_loss(student_out, teacher_out, self.teacher.center.center, cfg.student_temp, temp)
        self._teacher_out = [t.detach() for t in teacher_out]
        return loss, {"teacher_temp": temp}

    def after_backward(self, info: StepInfo) -> None:
        cancel_last_layer_gradients(self.head, info.epoch, self.cfg.freeze_last_layer_epochs)

    def after_step(self, info: StepInfo) -> None:
        momentum = momentum_at(info.step, info.total_steps, self.cfg.momentum)
        ema_update(self.teacher.net, self.student(), momentum)
        if self._teacher_out:
            self.teacher.center.update(self._teacher_out)
            self._teacher_out = []


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


def build_method(cfg: Config, num_classes: int) -> SSLMethod:
    """The configured method (``train.method``, resolved through ``registry.METHODS``) with a fresh
    backbone and its own config section (``cfg.simclr``, ``cfg.barlowtwins``, ``cfg.dino``); the
    initial weights depend on train.seed only. ``num_classes`` sizes the supervised classifier."""
    cls = METHODS.load(cfg.train.method)
    backbone = seeded_backbone(cfg.train)
    if cls is Supervised:
        return Supervised(backbone, num_classes)
    return cls(backbone, getattr(cfg, cfg.train.method))
