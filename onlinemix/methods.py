"""Training methods behind one interface, and the pairings that compose their views.

A method is an ``nn.Module`` holding the backbone (attribute ``backbone``, what the probe and
``backbone.safetensors`` use) and its heads. The trainer calls, per step:

    views = method.views(batch, pairing, epoch, ids)   # CPU: uint8 pairs -> float views (inside `with batch`)
    loss, logs = model(views, info)                     # forward through the accelerate-prepared module
    backward; [clip]; method.after_backward(info); optimizer.step(); method.after_step(info)

Pairings (``train.pairing``) say which image each view is cropped from; the augmentation recipe
follows the image's source (real images get the real-branch recipe, synthetic ones the
synthetic-branch recipe), and a sample without a synthetic view (``is_synthetic`` False: a
fallback) uses its real image wherever a synthetic one was asked for:

- ``mixdiff``: view a real, view b synthetic (DINO: 1 global + 6 local real crops, 1 global + 2
  local synthetic crops);
- ``real``: both views from the real image (plain SSL; DINO: multi-crop of the real image);
- ``synthetic``: both views from the synthetic image (the paper's "Syn" models);
- ``mixing``: each sample independently (50/50, the method's seeded generator) uses its real or
  its synthetic image for both views;
- ``sequential``: ``real`` for ``train.sequential_real_epochs`` epochs (0 = half), then ``synthetic``.

``supervised`` is a method, not a pairing: a linear classifier on the backbone trained with
cross-entropy on the real images' labels, on one view per sample from the pairing's source
(real, synthetic, mixing, sequential) or on both views for ``mixdiff`` (each image and its
variation, with the real label): the paper's supervised baselines on real, synthetic and mixed data.

DINO's teacher is an EMA copy of the student kept *outside* the module's registered children:
it is not wrapped by DDP, not seen by the optimizer and not in ``model.safetensors``; the trainer
moves it to the device and registers it with ``accelerator.register_for_checkpointing``
(``outside_modules``), so checkpoints carry it (``custom_checkpoint_0.pkl``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import MixDiffDinoCrops, MultiCrop, augment_second_views, multicrop_sizes, view_recipe
from .config import Config
from .dino import (
    DINOCenter,
    DINOHead,
    cancel_last_layer_gradients,
    dino_loss,
    ema_update,
    make_teacher,
    momentum_at,
    teacher_temperature,
)
from .losses import barlow_twins_loss, nt_xent
from .models import seeded_backbone, simclr_projector
from .pairs import PairImages

PAIRINGS = ("mixdiff", "real", "synthetic", "mixing", "sequential")


class StepInfo(NamedTuple):
    """Where training stands; ``step`` is the index of the step being taken (0-based)."""
    step: int
    epoch: int
    total_steps: int


def sequential_switch_epoch(cfg: Config) -> int:
    """First epoch of the synthetic phase of the 'sequential' pairing."""
    return cfg.train.sequential_real_epochs or cfg.train.epochs // 2


def pairing_at(pairing: str, epoch: int, switch_epoch: int) -> str:
    """The pairing in force at ``epoch`` ('sequential' resolves to 'real' or 'synthetic')."""
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; known: {PAIRINGS}")
    if pairing == "sequential":
        return "real" if epoch < switch_epoch else "synthetic"
    return pairing


class Sources(NamedTuple):
    """Per-sample images of the two views, and which of them are synthetic."""
    a: list[torch.Tensor]
    a_synthetic: torch.Tensor
    b: list[torch.Tensor]
    b_synthetic: torch.Tensor


def pair_sources(batch: PairImages, pairing: str, generator: torch.Generator) -> Sources:
    """Which image each view of each sample comes from under a resolved pairing (not 'sequential')."""
    real, other = list(batch.real), list(batch.other)
    synthetic = batch.is_synthetic.bool().cpu()
    none = torch.zeros(len(real), dtype=torch.bool)
    if pairing == "mixdiff":
        return Sources(real, none, other, synthetic)
    if pairing == "real":
        return Sources(real, none, real, none)
    if pairing == "synthetic":
        return Sources(other, synthetic, other, synthetic)
    if pairing == "mixing":
        pick = torch.rand(len(real), generator=generator) < 0.5
        images = [o if p else r for r, o, p in zip(real, other, pick.tolist(), strict=True)]
        return Sources(images, pick & synthetic, images, pick & synthetic)
    raise ValueError(f"pairing {pairing!r} must be resolved with pairing_at first")


class SSLMethod(nn.Module):
    """Shared base: backbone, the two-view recipes, the pairing logic and no-op hooks."""

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.switch_epoch = sequential_switch_epoch(cfg)
        self.view_generator = torch.Generator().manual_seed(cfg.train.seed)
        tc, res = cfg.train, cfg.data.resolution
        # A tuple, not attributes: v2 transforms are nn.Modules and would become children.
        self.transforms = (view_recipe(tc.augmentation, res, "real", cfg.data.min_crop_scale),
                           view_recipe(tc.augmentation, res, "synthetic", cfg.data.min_crop_scale))

    def seed_views(self, seed: int) -> None:
        """Reseed the generator of the view choices ('mixing'); the trainer makes it per rank."""
        self.view_generator.manual_seed(seed)

    def sources(self, batch: PairImages, pairing: str, epoch: int) -> Sources:
        return pair_sources(batch, pairing_at(pairing, epoch, self.switch_epoch), self.view_generator)

    def augment(self, images: list[torch.Tensor], synthetic: torch.Tensor) -> torch.Tensor:
        return augment_second_views(images, synthetic, *self.transforms)

    def views(self, batch: PairImages, pairing: str, epoch: int, ids: np.ndarray | None = None) -> list[torch.Tensor]:
        """The batch's float views on the CPU: [view a, view b] for two-view methods."""
        s = self.sources(batch, pairing, epoch)
        return [self.augment(s.a, s.a_synthetic), self.augment(s.b, s.b_synthetic)]

    def forward(self, views: list[torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
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

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__(cfg, backbone)
        self.projector = simclr_projector(backbone.out_dim, cfg.train.proj_dim)

    def forward(self, views: list[torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        view_a, view_b = views
        z_a, z_b = self.projector(self.backbone(torch.cat([view_a, view_b]))).chunk(2)
        return nt_xent(z_a, z_b, self.cfg.train.temperature), {}


def projector_sizes(spec: str) -> list[int]:
    return [int(x) for x in spec.split("-")]


class BarlowTwins(SSLMethod):
    """Cross-correlation loss between the two branches' projections (official projector:
    Linear-BN-ReLU blocks, a final Linear without bias; each branch a separate forward, so its
    BatchNorm statistics are its own, as in the official code)."""

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__(cfg, backbone)
        sizes = [backbone.out_dim, *projector_sizes(cfg.train.barlowtwins_projector)]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)

    def forward(self, views: list[torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        view_a, view_b = views
        z_a, z_b = self.projector(self.backbone(view_a)), self.projector(self.backbone(view_b))
        return barlow_twins_loss(z_a, z_b, self.cfg.train.barlowtwins_lambda), {}


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

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__(cfg, backbone)
        tc = cfg.train
        self.head = DINOHead(backbone.out_dim, tc.dino_out_dim, tc.dino_hidden_dim, tc.dino_bottleneck_dim,
                             num_layers=3, use_bn=tc.dino_use_bn, norm_last_layer=tc.dino_norm_last_layer)
        global_size, local_size = multicrop_sizes(cfg.data.resolution)
        global_scale, local_scale = (tc.dino_global_crop_min, 1.0), (0.05, tc.dino_global_crop_min)
        photometric = tc.augmentation != "no_augmentation"
        self.mixdiff_crops = MixDiffDinoCrops(global_size, local_size, 6, 2, global_scale, local_scale, photometric)
        self.multicrop = MultiCrop(global_size, local_size, 2, tc.dino_local_crops, global_scale, local_scale,
                                   photometric)
        # Bypass nn.Module.__setattr__: the teacher must not be a child (see the module docstring).
        object.__setattr__(self, "teacher", DINOTeacher(self.student(), tc.dino_out_dim, tc.dino_center_momentum))
        self._teacher_out: list[torch.Tensor] = []

    def student(self) -> nn.ModuleDict:
        """The student's networks, in the teacher's layout (no copy)."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def outside_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def views(self, batch: PairImages, pairing: str, epoch: int, ids: np.ndarray | None = None) -> list[torch.Tensor]:
        """The two globals first (the teacher's inputs), then the locals."""
        if pairing_at(pairing, epoch, self.switch_epoch) == "mixdiff":
            return self.mixdiff_crops(batch.real, batch.other).views
        return self.multicrop(self.sources(batch, pairing, epoch).a)  # single-source pairings: a is b

    def forward(self, views: list[torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        tc = self.cfg.train
        student_out = _multi_forward(self.backbone, self.head, views)
        with torch.no_grad():
            teacher_out = _multi_forward(self.teacher.net["backbone"], self.teacher.net["head"], views[:2])
        temp = teacher_temperature(info.epoch, tc.dino_warmup_teacher_temp, tc.dino_teacher_temp,
                                   tc.dino_warmup_teacher_temp_epochs)
        loss = dino_loss(student_out, teacher_out, self.teacher.center.center, tc.dino_student_temp, temp)
        self._teacher_out = [t.detach() for t in teacher_out]
        return loss, {"teacher_temp": temp}

    def after_backward(self, info: StepInfo) -> None:
        cancel_last_layer_gradients(self.head, info.epoch, self.cfg.train.dino_freeze_last_layer_epochs)

    def after_step(self, info: StepInfo) -> None:
        momentum = momentum_at(info.step, info.total_steps, self.cfg.train.dino_momentum)
        ema_update(self.teacher.net, self.student(), momentum)
        if self._teacher_out:
            self.teacher.center.update(self._teacher_out)
            self._teacher_out = []


class Supervised(SSLMethod):
    """Linear classifier on the backbone, cross-entropy on the real images' labels."""

    def __init__(self, cfg: Config, backbone: nn.Module, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__(cfg, backbone)
        self.classifier = nn.Linear(backbone.out_dim, num_classes)
        self.labels = labels.long().cpu()  # a plain attribute (not a buffer): indexed on the CPU by image id

    def views(self, batch: PairImages, pairing: str, epoch: int, ids: np.ndarray | None = None) -> list[torch.Tensor]:
        """[one or two image views, labels]; ``ids`` (the batch's image ids) are required."""
        if ids is None:
            raise ValueError("the supervised method needs the batch's image ids for its labels")
        s = self.sources(batch, pairing, epoch)
        out = [self.augment(s.a, s.a_synthetic)]
        if pairing_at(pairing, epoch, self.switch_epoch) == "mixdiff":
            out.append(self.augment(s.b, s.b_synthetic))
        return out + [self.labels[torch.as_tensor(np.asarray(ids), dtype=torch.long)]]

    def forward(self, views: list[torch.Tensor], info: StepInfo) -> tuple[torch.Tensor, dict[str, float]]:
        *images, labels = views
        logits = self.classifier(self.backbone(torch.cat(images)))
        targets = labels.repeat(len(images))
        accuracy = (logits.argmax(1) == targets).float().mean().item()
        return F.cross_entropy(logits, targets), {"train_top1": 100.0 * accuracy}


METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "barlowtwins": BarlowTwins, "dino": DINO,
                                       "supervised": Supervised}


def build_method(cfg: Config, labels: torch.Tensor | None = None, num_classes: int | None = None) -> SSLMethod:
    """The configured method with a fresh backbone; the initial weights depend on train.seed only.
    ``labels`` (indexed by image id) and ``num_classes`` are needed by 'supervised' only."""
    if cfg.train.method not in METHODS:
        raise ValueError(f"unknown method {cfg.train.method!r}; known: {sorted(METHODS)}")
    backbone = seeded_backbone(cfg.train)
    cls = METHODS[cfg.train.method]
    if cls is Supervised:
        if labels is None or num_classes is None:
            raise ValueError("the supervised method needs the real images' labels and the number of classes")
        return Supervised(cfg, backbone, labels, num_classes)
    return cls(cfg, backbone)
