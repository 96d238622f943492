"""LARS against hand-computed updates, weight-decay grouping, optimizer choice and the lr rules."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from onlinemix.methods.optim import (
    LARS,
    build_optimizer,
    cosine_with_warmup,
    param_groups,
    scaled_lr,
)

LR, WD, ETA, MOMENTUM = 0.5, 0.1, 0.001, 0.9


def linear_with(weight: list[float], bias: float) -> nn.Linear:
    """A 2-parameter-tensor model: a (1, 2) weight, which LARS adapts, and a (1,) bias, which it must not."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight]))
        model.bias.fill_(bias)
    return model


def set_grads(model: nn.Linear, weight_grad: list[float], bias_grad: float) -> None:
    model.weight.grad = torch.tensor([weight_grad])
    model.bias.grad = torch.tensor([bias_grad])


def test_lars_one_step_matches_the_trust_ratio_formula() -> None:
    model = linear_with([3.0, 4.0], 0.5)  # ||w|| = 5
    opt = LARS(model.parameters(), lr=LR, weight_decay=WD, momentum=MOMENTUM, trust_coefficient=ETA)
    set_grads(model, [0.6, -0.8], 0.2)
    opt.step()
    # weight: g + wd * w = (0.9, -0.4), ||.|| = sqrt(0.97); trust = 0.001 * 5 / sqrt(0.97)
    trust = ETA * 5.0 / math.sqrt(0.97)
    expected_w = [3.0 - LR * trust * 0.9, 4.0 - LR * trust * -0.4]
    assert model.weight.detach().squeeze(0).tolist() == pytest.approx(expected_w, rel=1e-6)
    # bias: no decay, no trust ratio, although its group has weight_decay 0.1
    assert model.bias.item() == pytest.approx(0.5 - LR * 0.2, rel=1e-6)


def test_lars_momentum_accumulates_the_scaled_updates() -> None:
    model = linear_with([3.0, 4.0], 0.5)
    opt = LARS(model.parameters(), lr=LR, weight_decay=WD, momentum=MOMENTUM, trust_coefficient=ETA)
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)
    g = torch.tensor([0.6, -0.8], dtype=torch.float64)
    mu = torch.zeros(2, dtype=torch.float64)
    for _ in range(2):
        set_grads(model, g.tolist(), 0.2)
        opt.step()
        update = g + WD * w
        mu = MOMENTUM * mu + ETA * w.norm() / update.norm() * update
        w = w - LR * mu
    assert model.weight.detach().squeeze(0).tolist() == pytest.approx(w.tolist(), rel=1e-6)
    assert model.bias.item() == pytest.approx(0.5 - LR * 0.2 - LR * (MOMENTUM * 0.2 + 0.2), rel=1e-6)


def test_lars_trust_ratio_is_one_for_a_zero_weight() -> None:
    model = linear_with([0.0, 0.0], 0.0)
    opt = LARS(model.parameters(), lr=LR, weight_decay=WD, momentum=MOMENTUM, trust_coefficient=ETA)
    set_grads(model, [0.6, -0.8], 0.0)
    opt.step()
    assert model.weight.detach().squeeze(0).tolist() == pytest.approx([-LR * 0.6, LR * 0.8])


def test_lars_leaves_batchnorm_parameters_unadapted_and_undecayed() -> None:
    bn = nn.BatchNorm1d(3)
    opt = LARS(bn.parameters(), lr=LR, weight_decay=WD, momentum=MOMENTUM, trust_coefficient=ETA)
    bn.weight.grad = torch.tensor([0.1, -0.2, 0.3])
    bn.bias.grad = torch.tensor([0.5, 0.0, -0.5])
    opt.step()
    assert bn.weight.detach().tolist() == pytest.approx([1 - LR * 0.1, 1 + LR * 0.2, 1 - LR * 0.3])
    assert bn.bias.detach().tolist() == pytest.approx([-LR * 0.5, 0.0, LR * 0.5])


def test_lars_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        LARS(nn.Linear(2, 1).parameters(), lr=0.1, momentum=1.0)


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_param_groups_exclude_biases_and_norms_from_decay() -> None:
    net = small_net()
    net[3].bias.requires_grad_(False)  # frozen parameters are left out entirely
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias)}


@pytest.mark.parametrize(("name", "cls"), [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lars", LARS)])
def test_build_optimizer(name: str, cls: type) -> None:
    opt = build_optimizer(name, small_net(), lr=0.3, weight_decay=1e-4, momentum=0.8)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.3 for g in opt.param_groups)
    if name != "adamw":
        assert all(g["momentum"] == 0.8 for g in opt.param_groups)


def test_build_optimizer_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer("adam", small_net(), 0.1, 0.0)


def test_cosine_with_warmup_endpoints() -> None:
    base, final, total, warmup = 1.0, 0.1, 110, 10
    assert cosine_with_warmup(0, total, warmup, base, final) == pytest.approx(0.1)  # base / warmup: moves at once
    assert cosine_with_warmup(4, total, warmup, base, final) == pytest.approx(0.5)  # linear
    assert cosine_with_warmup(warmup - 1, total, warmup, base, final) == pytest.approx(base)
    assert cosine_with_warmup(warmup, total, warmup, base, final) == pytest.approx(base)
    assert cosine_with_warmup(60, total, warmup, base, final) == pytest.approx((base + final) / 2)  # half-way
    assert cosine_with_warmup(total, total, warmup, base, final) == pytest.approx(final)
    assert cosine_with_warmup(total + 50, total, warmup, base, final) == pytest.approx(final)
    after = [cosine_with_warmup(s, total, warmup, base, final) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in pairwise(after))


def test_cosine_defaults_to_zero_and_handles_no_warmup() -> None:
    assert cosine_with_warmup(0, 100, 0, 2.0) == pytest.approx(2.0)
    assert cosine_with_warmup(100, 100, 0, 2.0) == pytest.approx(0.0)
    assert cosine_with_warmup(25, 100, 0, 2.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_scaled_lr_is_linear_in_the_batch() -> None:
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)
    assert scaled_lr(0.5, 1024, reference=512) == pytest.approx(1.0)
