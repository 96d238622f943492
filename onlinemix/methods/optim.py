"""Optimisers and learning-rate rules of the SSL recipes: AdamW (MixDiff's), SGD, and LARS
(SimCLR's and BarlowTwins'), with biases and normalisation parameters kept out of weight decay.

Why exclude 1-d parameters: decaying a bias or a BatchNorm scale toward zero fights the
normalisation instead of regularising capacity, and LARS's per-layer trust ratio is meaningless
for them (SimCLR and BarlowTwins exclude both; every parameter with ndim 1 is a bias or a norm
scale/shift in these networks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "lars", "sgd")


def _excluded(p: torch.Tensor) -> bool:
    """Biases and BatchNorm/LayerNorm parameters: the 1-d tensors."""
    return p.ndim <= 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights with `weight_decay`, 1-d parameters (biases, norms) without it."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if not _excluded(p)], "weight_decay": weight_decay},
            {"params": [p for p in params if _excluded(p)], "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling, as in BarlowTwins' (and SimCLR's) official code.

    Per parameter: g = grad + wd * p; for non-excluded p, g *= eta * ||p|| / ||g|| (1 when
    either norm is 0); mu = momentum * mu + g; p -= lr * mu. 1-d parameters (biases, norms) get
    neither weight decay nor the trust ratio, whatever their group's weight_decay says.
    SimCLR's TF version folds lr into the momentum buffer; with a constant lr both are identical.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, trust_coefficient={trust_coefficient}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not _excluded(p):
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * p_norm / u_norm, torch.ones_like(p_norm))
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                mu = state["momentum_buffer"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """One of OPTIMIZERS over `param_groups(model, weight_decay)`; momentum is ignored by AdamW."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                       final_lr: float = 0.0) -> float:
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay to final_lr.

    Warm-up step s uses base_lr * (s + 1) / warmup_steps so the first step already moves; from
    `total_steps` on the rate stays at final_lr.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int, reference: int = 256) -> float:
    """The linear scaling rule (Goyal et al., used by SimCLR, BarlowTwins, DINO): lr = base_lr * batch / 256."""
    return base_lr * global_batch / reference
