"""DINO: the loss against the formula and by hand, the view pairs of MixDiff's multi-crop,
the head, centering, schedules and the EMA teacher."""

import math

import pytest
import torch
from torch import nn

from onlinemix.methods.dino import (
    DINOCenter,
    DINOHead,
    cancel_last_layer_gradients,
    dino_loss,
    dino_pairs,
    ema_update,
    make_teacher,
    momentum_at,
    teacher_temperature,
)

# MixDiff's composition, globals first: real global, synthetic global, 6 real locals, 2 synthetic.
MIXDIFF_STUDENT_VIEWS = 10
MIXDIFF_TEACHER_VIEWS = 2


def dino_from_formula(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                      student_temp: float, teacher_temp: float, same_view: list[int]) -> torch.Tensor:
    """(1 / #pairs) sum over teacher views t and student views s != same_view[t] of
    (1 / B) sum_b sum_k -P_t[b, k] log P_s[b, k], P_t = softmax((t - c) / T_t), P_s = softmax(s / T_s)."""

    def softmax(logits: list[torch.Tensor]) -> list[torch.Tensor]:
        exps = [torch.exp(x) for x in logits]
        return [e / sum(exps) for e in exps]

    total, pairs = torch.zeros((), dtype=torch.float64), 0
    for t, t_out in enumerate(teacher):
        for s, s_out in enumerate(student):
            if s == same_view[t]:
                continue
            pairs += 1
            batch = t_out.shape[0]
            for b in range(batch):
                classes = range(t_out.shape[1])
                p_t = softmax([(t_out[b, k].detach() - center[0, k]) / teacher_temp for k in classes])
                p_s = softmax([s_out[b, k] / student_temp for k in classes])
                total = total + sum(-p_t[k] * torch.log(p_s[k]) for k in classes) / batch
    return total / pairs


def views(count: int, batch: int, classes: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(batch, classes, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(count)]


@pytest.mark.parametrize("num_teacher,num_student,same_view", [(2, 4, [0, 1]), (2, 5, [3, 1]), (1, 3, [2])])
def test_loss_matches_formula_value_and_gradient(num_teacher: int, num_student: int, same_view: list[int]) -> None:
    gen = torch.Generator().manual_seed(num_student)
    student, teacher = views(num_student, 3, 5, gen), views(num_teacher, 3, 5, gen)
    center = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    ours = dino_loss(student, teacher, center, 0.1, 0.04, same_view)
    ours.backward()
    grad_ours = [s.grad for s in student]
    reference = dino_from_formula(student, teacher, center, 0.1, 0.04, same_view)
    grad_ref = torch.autograd.grad(reference, student, allow_unused=True)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    for g_ours, g_ref in zip(grad_ours, grad_ref):
        if g_ref is None:  # a single teacher view leaves its own crop out of the loss entirely
            assert g_ours is None
        else:
            torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)
    assert all(t.grad is None for t in teacher), "the teacher must receive no gradient"


def test_hand_computed_two_class_value() -> None:
    # Teacher: (t - c) / T_t = (2 ln 3, 0) / 2 -> P_t = (3/4, 1/4). Student view 1: (0, 0.1 ln 3) / 0.1
    # -> P_s = (1/4, 3/4), H = -(3/4) ln(1/4) - (1/4) ln(3/4). Student view 0 is the teacher's own
    # crop: skipped, though it would change the mean (its cross-entropy is different).
    ln3 = math.log(3)
    teacher = [torch.tensor([[3 * ln3, ln3]])]
    center = torch.tensor([[ln3, ln3]])
    student = [torch.tensor([[0.1 * ln3, 0.0]]), torch.tensor([[0.0, 0.1 * ln3]])]
    expected = -0.75 * math.log(0.25) - 0.25 * math.log(0.75)
    loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=2.0, same_view=[0])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_mixdiff_composition_pairs_every_teacher_global_with_every_other_view() -> None:
    # The paper's sum: X_t in {real global, synthetic global}, X_s among the 10 student views,
    # X_s != X_t, so 2 * (10 - 1) = 18 terms; the real global teaches the synthetic one and back.
    pairs = dino_pairs(MIXDIFF_TEACHER_VIEWS, MIXDIFF_STUDENT_VIEWS)
    assert len(pairs) == 2 * (MIXDIFF_STUDENT_VIEWS - 1) == 18
    assert (0, 0) not in pairs and (1, 1) not in pairs
    assert (0, 1) in pairs and (1, 0) in pairs
    assert len(set(pairs)) == len(pairs)


def test_mixdiff_loss_averages_over_the_18_pairs() -> None:
    gen = torch.Generator().manual_seed(7)
    student, teacher = views(MIXDIFF_STUDENT_VIEWS, 2, 4, gen), views(MIXDIFF_TEACHER_VIEWS, 2, 4, gen)
    center = torch.zeros(1, 4, dtype=torch.float64)
    ours = dino_loss(student, teacher, center, 0.1, 0.07)
    torch.testing.assert_close(ours.double(), dino_from_formula(student, teacher, center, 0.1, 0.07, [0, 1]),
                               rtol=1e-5, atol=1e-6)


def test_same_view_follows_the_callers_order() -> None:
    # Student views ordered real global, 6 real locals, synthetic global, 2 synthetic locals.
    pairs = dino_pairs(2, 10, same_view=[0, 7])
    assert len(pairs) == 18 and (0, 0) not in pairs and (1, 7) not in pairs and (1, 1) in pairs


@pytest.mark.parametrize("same_view", [[0], [0, 10], [-1, 1]])
def test_rejects_bad_same_view(same_view: list[int]) -> None:
    with pytest.raises(ValueError, match="same_view"):
        dino_pairs(2, 10, same_view)


def test_rejects_views_with_nothing_to_compare() -> None:
    with pytest.raises(ValueError, match="at least one pair"):
        dino_loss([torch.zeros(2, 3)], [torch.zeros(2, 3)], torch.zeros(1, 3), 0.1, 0.04)


def test_loss_is_fp32_under_autocast() -> None:
    gen = torch.Generator().manual_seed(3)
    student = [torch.randn(4, 64, generator=gen) for _ in range(3)]
    teacher = [torch.randn(4, 64, generator=gen) for _ in range(2)]
    center = torch.zeros(1, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dino_loss([s.bfloat16() for s in student], [t.bfloat16() for t in teacher], center, 0.1, 0.04)
    assert mixed.dtype == torch.float32
    exact = dino_loss([s.bfloat16().float() for s in student], [t.bfloat16().float() for t in teacher],
                      center, 0.1, 0.04)
    torch.testing.assert_close(mixed, exact, rtol=1e-6, atol=1e-6)


def storage_pointers(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def small_student() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4))


def test_teacher_is_an_independent_copy_without_gradients() -> None:
    student = small_student()
    teacher = make_teacher(student)
    assert storage_pointers(student).isdisjoint(storage_pointers(teacher))
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in student.parameters())
    for p_student, p_teacher in zip(student.parameters(), teacher.parameters(), strict=True):
        torch.testing.assert_close(p_student, p_teacher)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))


def test_ema_update_moves_the_teacher_towards_the_student() -> None:
    student, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(3.0)
        for p in teacher.parameters():
            p.fill_(1.0)
    ema_update(teacher, student, momentum=0.75)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.75 * 1.0 + 0.25 * 3.0))
    for p in student.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 3.0))


def test_momentum_schedule_is_cosine_from_base_to_one() -> None:
    assert momentum_at(0, 100, 0.996) == pytest.approx(0.996)
    assert momentum_at(50, 100, 0.996) == pytest.approx((0.996 + 1) / 2)
    assert momentum_at(100, 100, 0.996) == pytest.approx(1.0)
    assert momentum_at(25, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


def test_teacher_temperature_warms_up_linearly_then_holds() -> None:
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(29, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(100, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(1, 0.04, 0.07, 3) == pytest.approx(0.055)
    assert teacher_temperature(0, 0.04, 0.07, 0) == pytest.approx(0.07)


def test_center_update_by_hand() -> None:
    center = DINOCenter(2, momentum=0.9)
    # Two teacher views of a batch of 2: mean row (4, 5); center 0.9 * 0 + 0.1 * (4, 5).
    center.update([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])])
    torch.testing.assert_close(center.center, torch.tensor([[0.4, 0.5]]))
    center.update([torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 1.0]])])  # mean (1, 1)
    torch.testing.assert_close(center.center, torch.tensor([[0.9 * 0.4 + 0.1, 0.9 * 0.5 + 0.1]]))
    assert "center" in center.state_dict()


def test_head_logits_are_cosines_to_unit_prototypes() -> None:
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4)
    out = head(1e6 * torch.randn(5, 8, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (5, 32)
    assert out.abs().max().item() <= 1 + 1e-5
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(32))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    free = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


@pytest.mark.parametrize("num_layers,use_bn", [(1, False), (3, True)])
def test_head_layer_options(num_layers: int, use_bn: bool) -> None:
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4, num_layers=num_layers, use_bn=use_bn)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == num_layers
    assert any(isinstance(m, nn.BatchNorm1d) for m in head.mlp.modules()) == use_bn
    assert head(torch.randn(3, 8)).shape == (3, 32)


def test_last_layer_gradients_cancelled_only_while_frozen() -> None:
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    x = torch.randn(4, 8)
    for epoch, frozen in [(0, True), (1, True), (2, False), (5, False)]:
        head.zero_grad(set_to_none=True)
        head(x).square().sum().backward()
        cancel_last_layer_gradients(head, epoch, freeze_last_layer_epochs=2)
        assert all((p.grad is None) == frozen for p in head.last_layer.parameters()), epoch
        assert all(p.grad is not None for p in head.mlp.parameters()), epoch
