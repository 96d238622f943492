"""NT-Xent and BarlowTwins against straightforward implementations written from the formulas, and by hand."""

import math
from collections.abc import Callable

import pytest
import torch

from onlinemix.methods.losses import barlow_twins_loss, nt_xent


def nt_xent_from_formula(z_a: torch.Tensor, z_b: torch.Tensor, tau: float) -> torch.Tensor:
    """l(i, j) = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) ),
    averaged over all 2N anchors, where j is i's partner in the other branch."""
    z = list(z_a) + list(z_b)
    n = len(z_a)

    def sim(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.dot(u, v) / (u.norm() * v.norm())

    total = torch.zeros((), dtype=torch.float64)
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        numerator = torch.exp(sim(z[i], z[j]) / tau)
        denominator = sum(torch.exp(sim(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (5, 8, 0.1), (8, 4, 1.0)])
def test_matches_formula_value_and_gradient(n: int, d: int, tau: float) -> None:
    gen = torch.Generator().manual_seed(n * 100 + d)
    z_a = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = nt_xent(z_a, z_b, tau)
    grad_ours = torch.autograd.grad(ours, (z_a, z_b))
    reference = nt_xent_from_formula(z_a, z_b, tau)
    grad_ref = torch.autograd.grad(reference, (z_a, z_b))
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    for g_ours, g_ref in zip(grad_ours, grad_ref):
        torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_hand_computed_value() -> None:
    # Anchors e1, e2 with partners e1, e2: each anchor sees its positive at similarity 1 and
    # two negatives at similarity 0, so every term is -log(e / (e + 2)) = log(1 + 2/e).
    eye = torch.eye(2)
    assert nt_xent(eye, eye.clone(), 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


def test_positive_is_the_partner_not_any_row() -> None:
    # Swapping the partners of two anchors must change the loss: positives are (i, i+N).
    gen = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    assert nt_xent(z_a, z_b, 0.2) != pytest.approx(nt_xent(z_a, z_b[[1, 0, 2, 3]], 0.2).item())


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.zeros(4, 3), torch.zeros(5, 3), 0.1)


def barlow_twins_from_formula(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float, eps: float) -> torch.Tensor:
    """Each dimension standardised over the batch (biased variance), C_ij = sum_b a_bi * b_bj / N,
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2."""
    n, d = z_a.shape

    def standardise(z: torch.Tensor) -> list[list[torch.Tensor]]:
        columns = []
        for j in range(d):
            values = [z[k, j] for k in range(n)]
            mean = sum(values) / n
            var = sum((v - mean) ** 2 for v in values) / n
            columns.append([(v - mean) / torch.sqrt(var + eps) for v in values])
        return columns

    a, b = standardise(z_a), standardise(z_b)
    loss = torch.zeros((), dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss = loss + ((1 - c_ij) ** 2 if i == j else lambd * c_ij**2)
    return loss


@pytest.mark.parametrize("n,d,lambd", [(3, 2, 0.5), (6, 4, 0.005), (5, 7, 1.0)])
def test_barlow_twins_matches_formula_value_and_gradient(n: int, d: int, lambd: float) -> None:
    gen = torch.Generator().manual_seed(n * 10 + d)
    z_a = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = barlow_twins_loss(z_a, z_b, lambd)
    grad_ours = torch.autograd.grad(ours, (z_a, z_b))
    reference = barlow_twins_from_formula(z_a, z_b, lambd, eps=1e-5)
    grad_ref = torch.autograd.grad(reference, (z_a, z_b))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    for g_ours, g_ref in zip(grad_ours, grad_ref):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-10)


def test_barlow_twins_hand_computed_value() -> None:
    # Standardised (eps = 0), z_a's columns are (-1, 1) and (1, -1), z_b's (-1, 1) and (-1, 1), so
    # C = [[1, 1], [-1, -1]]: on-diagonal (1 - 1)^2 + (1 + 1)^2 = 4, off-diagonal 1 + 1 = 2.
    z_a = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    z_b = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    assert barlow_twins_loss(z_a, z_b, lambd=0.5, eps=0.0).item() == pytest.approx(4 + 0.5 * 2)


def test_barlow_twins_perfectly_correlated_views_cost_nothing() -> None:
    # Identical, decorrelated (orthogonal) columns give C = I, the loss's minimum.
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert barlow_twins_loss(z, z.clone(), lambd=0.1, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)


def test_barlow_twins_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(torch.zeros(4, 3), torch.zeros(4, 2), 0.005)


@pytest.mark.parametrize("loss,n,d,seed", [(lambda a, b: nt_xent(a, b, 0.05), 16, 32, 1),
                                            (lambda a, b: barlow_twins_loss(a, b, 0.005), 64, 16, 2)],
                         ids=["nt_xent", "barlow_twins"])
def test_loss_stays_fp32_under_autocast(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int, d: int,
                                        seed: int) -> None:
    # bf16 logits / 0.05 would round NT-Xent visibly, and bf16 would lose BarlowTwins' small
    # off-diagonal correlations; each loss must match its fp32 value.
    gen = torch.Generator().manual_seed(seed)
    z_a, z_b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(z_a, z_b)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, loss(z_a, z_b), rtol=1e-6, atol=1e-6)
