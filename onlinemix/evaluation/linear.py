"""The paper's linear evaluation protocol: a linear classifier on a frozen backbone, trained on augmented real images.

The fast probe (:mod:`onlinemix.evaluation.probe`) computes each image's features once and fits on them. Here,
as in the official code's linear evaluation (solo-learn, which MixDiff builds on), every epoch sees a
fresh RandomResizedCrop + horizontal flip of every training image, so the backbone runs on every image
in every epoch. The views are made a batch at a time by the view backend the run chose
(``train.augment_backend``: the plain-torch backend on the CPU, the Triton kernels on CUDA), from the
images at their stored size (a store is read by id, a batch at a time). The backbone stays frozen: eval
mode (BatchNorm uses and keeps its running statistics), no gradients. The layer is trained with SGD
(``linear_eval.*``, defaults and their source in :class:`~onlinemix.core.config.LinearEvalConfig`) and scored
by the eval command on the deterministic test view, the fast probe's: the centre crop at the run's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from onlinemix.core.config import LinearEvalConfig
from onlinemix.data import Images
from onlinemix.views.backends import ViewBackend, make_backend
from onlinemix.views.recipes import ViewRecipe
from onlinemix.views.specs import ViewSpec

LR_BATCH = 256  # linear_eval.lr is given per this many images


def training_view(resolution: int, min_crop_scale: float) -> ViewSpec:
    """RandomResizedCrop (area scale [min_crop_scale, 1], aspect 3/4..4/3) to ``resolution`` + horizontal flip,
    nothing else: the linear evaluation's training augmentation."""
    return ViewSpec(ViewRecipe(crop_scale=(min_crop_scale, 1.0)).geometric_only(), resolution, "real")


@dataclass(frozen=True)
class LinearProtocol:
    """How the classifier is trained: the settings, the view backend's name and the training view."""

    cfg: LinearEvalConfig
    backend: str          # after views.choose_backend
    view: ViewSpec
    seed: int = 0

    @property
    def lr(self) -> float:
        return self.cfg.lr * self.cfg.batch_size / LR_BATCH

    def milestones(self) -> list[int]:
        return [round(f * self.cfg.epochs) for f in LinearEvalConfig.lr_milestones]

    def describe(self) -> str:
        c, crop = self.cfg, self.view.recipe.crop_scale
        decay = " and ".join(str(m) for m in self.milestones())
        return (f"the paper's linear evaluation (official code: solo-learn): a linear layer on the frozen backbone (eval "
                f"mode, BatchNorm statistics frozen), SGD momentum {c.momentum}, lr {self.lr:g} ({c.lr:g} per "
                f"{LR_BATCH} images), weight decay {c.weight_decay:g}, batch {c.batch_size}, {c.epochs} epochs, lr x"
                f"{LinearEvalConfig.lr_gamma:g} at epochs {decay}; every epoch a fresh RandomResizedCrop (scale "
                f"[{crop[0]:g}, 1]) + horizontal flip of every training image by the {self.backend} view backend; "
                f"scored on the centre crop; seed {self.seed}")


def _seeds(seed: int) -> tuple[int, int]:
    """Independent seeds of the epochs' image order and of the views."""
    order, views = np.random.SeedSequence(seed).generate_state(2)
    return int(order), int(views)


def augment(backend: ViewBackend, images: torch.Tensor, view: ViewSpec) -> torch.Tensor:
    """One training view of each image (normalised floats on the backend's device)."""
    return backend(images, torch.zeros(len(images), dtype=torch.bool), view, view)


def fit_linear_classifier(backbone: nn.Module, images: Images, labels: torch.Tensor, n_classes: int,
                          protocol: LinearProtocol, device: torch.device, desc: str | None = "linear eval") -> nn.Linear:
    """A linear layer on ``backbone``'s features of augmented ``images`` (uint8, stored size), trained with
    SGD; the backbone is left exactly as it was (weights, BatchNorm statistics, train/eval mode)."""
    cfg = protocol.cfg
    order_seed, view_seed = _seeds(protocol.seed)
    order = torch.Generator().manual_seed(order_seed)
    was_training = backbone.training
    backbone.eval()
    head = nn.Linear(backbone.out_dim, n_classes).to(device)
    nn.init.zeros_(head.weight)  # a convex problem: the views and their order alone make the result
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=protocol.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, protocol.milestones(), LinearEvalConfig.lr_gamma)
    steps = -(-len(images) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps, desc=desc, unit="step", leave=False, disable=desc is None)
    with torch.random.fork_rng(devices=[]):  # the torchvision backend draws from the global generator
        torch.manual_seed(view_seed)
        backend = make_backend(protocol.backend, device, view_seed)
        for _ in range(cfg.epochs):
            for ids in torch.randperm(len(images), generator=order).split(cfg.batch_size):
                with torch.no_grad():
                    x = backbone(augment(backend, images[ids], protocol.view)).float()
                loss = F.cross_entropy(head(x), labels[ids].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
            schedule.step()
    bar.close()
    backbone.train(was_training)
    return head.requires_grad_(False)
