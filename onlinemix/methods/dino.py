"""DINO: the method, its settings (the ``dino`` section), and its parts: the self-distillation
loss, projection head, centering, schedules and EMA teacher, following the official implementation
(facebookresearch/dino).

MixDiff's multi-crop: the student sees 1 global + 6 local crops of the real image and
1 global + 2 local crops of its synthetic variation (10 views); the EMA teacher sees the two
globals. The loss averages the cross-entropy over every (teacher view, student view) pair of
different views, the paper's sum over X_t in {x_1^g, x~_2^g}, X_s in V~, X_s != X_t: each
teacher view skips only the student view that is the same crop, 2 * (10 - 1) = 18 pairs.
Pass the student views with the two globals first, real then synthetic, matching the
teacher's order, and the default ``same_view`` is right.

The teacher is an EMA copy of the student kept *outside* the module's registered children: it is
not wrapped by DDP, not seen by the optimizer and not in ``model.safetensors``; the trainer moves
it to the device and registers it with ``accelerator.register_for_checkpointing``
(``outside_modules``), so checkpoints carry it (``custom_checkpoint_0.pkl``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onlinemix.core.config import MethodSettings, opt
from onlinemix.core.distributed import all_reduce_mean_no_grad
from onlinemix.methods.base import SSLMethod, StepInfo
from onlinemix.views.compose import MultiCrops, Views


@dataclass
class DINOConfig(MethodSettings):
    """train.method 'dino'."""
    out_dim: int = opt(256, "prototypes K of the DINO head (official: 65536)", low=2, high=1_000_000,
                       fixed_on_resume=True)
    hidden_dim: int = opt(128, "hidden width of the head's MLP (official: 2048)", low=2, high=65536,
                          fixed_on_resume=True)
    bottleneck_dim: int = opt(64, "bottleneck before the weight-normalised last layer (official: 256)",
                              low=2, high=65536, fixed_on_resume=True)
    use_bn: bool = opt(False, "BatchNorm in the head's MLP (official: false)", fixed_on_resume=True)
    norm_last_layer: bool = opt(True, "freeze the last layer's weight-norm magnitude at 1 (official: true)",
                                fixed_on_resume=True)
    student_temp: float = opt(0.1, "student softmax temperature", low=1e-4, high=10.0)
    teacher_temp: float = opt(0.04, "teacher softmax temperature after the warm-up", low=1e-4, high=10.0)
    warmup_teacher_temp: float = opt(0.04, "teacher temperature at epoch 0", low=1e-4, high=10.0)
    warmup_teacher_temp_epochs: int = opt(0, "epochs of linear teacher-temperature warm-up", low=0)
    momentum: float = opt(0.996, "base EMA momentum of the teacher (cosine to 1 over training)", low=0.0, high=1.0)
    center_momentum: float = opt(0.9, "EMA momentum of the teacher-output center", low=0.0, high=1.0)
    freeze_last_layer_epochs: int = opt(1, "epochs during which the head's last layer gets no update", low=0)
    global_crop_min: float = opt(0.4, "global crops cover [this, 1] of the image; local crops [0.05, this] "
                                 "(official: 0.4 for ViTs, 0.14 for ResNet-50)", low=0.06, high=1.0)
    local_crops: int = opt(8, "local crops per image for the single-source pairings (real, synthetic, mixing, "
                           "sequential); mixdiff always uses the paper's 6 real + 2 synthetic", low=0, high=64)


def dino_pairs(num_teacher_views: int, num_student_views: int,
               same_view: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The (teacher view, student view) pairs DINO's loss averages over: all of them except
    each teacher view with its own crop, ``same_view[t]`` (by default student view ``t``: the
    student's globals come first, in the teacher's order)."""
    same_view = list(range(num_teacher_views)) if same_view is None else list(same_view)
    if len(same_view) != num_teacher_views or not all(0 <= s < num_student_views for s in same_view):
        raise ValueError(f"same_view must map each of the {num_teacher_views} teacher views to a student view "
                         f"index below {num_student_views}, got {same_view}")
    pairs = [(t, s) for t in range(num_teacher_views) for s in range(num_student_views) if s != same_view[t]]
    if not pairs:
        raise ValueError("DINO needs at least one pair of different teacher and student views")
    return pairs


def dino_loss(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float, same_view: Sequence[int] | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over ``dino_pairs`` of the cross-entropy H(teacher, student), each averaged over the
    batch. Teacher probabilities are softmax((t - center) / teacher_temp), detached: centering
    and sharpening are what keep the teacher from collapsing; it learns only through the EMA.

    ``student_out``: one (B, K) tensor per student view; ``teacher_out``: one per teacher
    (global) view; ``same_view[t]``: the student view that is the same crop as teacher view
    ``t`` (see ``dino_pairs``). Each rank's value is its local batch mean, so DDP's gradient
    averaging equals one process on the global batch. Computed in fp32 whatever autocast does.
    ``weights`` (B,), mean 1: each image's share of every pair's batch mean (``train.pair_weighting``).
    """
    pairs = dino_pairs(len(teacher_out), len(student_out), same_view)
    device = student_out[0].device
    with torch.autocast(device_type=device.type, enabled=False):
        teacher_probs = [F.softmax((t.detach().float() - center.float()) / teacher_temp, dim=-1)
                         for t in teacher_out]
        student_log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
        per_image = [torch.sum(-teacher_probs[t] * student_log_probs[s], dim=-1) for t, s in pairs]
        total = sum((h if weights is None else h * weights).mean() for h in per_image)
    return total / len(pairs)


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalisation -> weight-normalised linear layer to ``out_dim``
    prototypes. With ``norm_last_layer`` the weight norm's magnitude is frozen at 1, so the
    logits are cosines between the bottleneck feature and each prototype, bounded by 1: the
    official code's choice for training stability."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if num_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            for i in range(num_layers - 1):
                layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINOCenter(nn.Module):
    """EMA of the teacher's mean output over the global batch; subtracting it from the teacher's
    logits stops one prototype dominating. A buffer, so checkpoints carry it."""

    center: torch.Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def update(self, teacher_out: Sequence[torch.Tensor]) -> None:
        """center <- m * center + (1 - m) * mean of all teacher views' rows over all ranks
        (ranks are assumed to hold equal batches, as DDP's samplers give)."""
        batch_center = torch.cat([t.float() for t in teacher_out]).mean(dim=0, keepdim=True)
        self.center.mul_(self.momentum).add_(all_reduce_mean_no_grad(batch_center), alpha=1 - self.momentum)


def teacher_temperature(epoch: int, warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int) -> float:
    """Teacher temperature: linear from ``warmup_teacher_temp`` at epoch 0 to ``teacher_temp`` at
    epoch ``warmup_epochs - 1`` (the official np.linspace), constant after. A too sharp teacher
    early on destabilises training, hence the warm-up; ``warmup_epochs <= 1`` means none."""
    if epoch >= warmup_epochs - 1:
        return teacher_temp
    return warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * epoch / (warmup_epochs - 1)


def cancel_last_layer_gradients(head: DINOHead, epoch: int, freeze_last_layer_epochs: int) -> None:
    """Drop the last layer's gradients during the first ``freeze_last_layer_epochs`` epochs (call
    between backward and the optimiser step): letting the prototypes move while the rest of
    the network is random makes DINO unstable."""
    if epoch >= freeze_last_layer_epochs:
        return
    for parameter in head.last_layer.parameters():
        parameter.grad = None


def make_teacher(student: nn.Module) -> nn.Module:
    """An independent deep copy of the (unwrapped, not DDP) student without gradients: the
    teacher is updated only by ``ema_update``, never by the optimiser."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.
    Buffers are the teacher's own (e.g. BatchNorm statistics of its own forward passes)."""
    for p_teacher, p_student in zip(teacher.parameters(), student.parameters(), strict=True):
        p_teacher.lerp_(p_student.detach(), 1.0 - momentum)


def momentum_at(step: int, total_steps: int, base_momentum: float) -> float:
    """Teacher EMA momentum: cosine from ``base_momentum`` at step 0 to 1 at ``total_steps``, so
    the teacher moves less and less as training converges."""
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


# ----------------------------------------------------------------------------- the method


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
        # The pair signal: the teacher's outputs for the two globals (real and synthetic under MixDiff).
        weights = self.observe_pairs(teacher_out[0], teacher_out[1])
        loss = dino_loss(student_out, teacher_out, self.teacher.center.center, cfg.student_temp, temp,
                         weights=weights)
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
