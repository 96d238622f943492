"""NT-Xent against a straightforward implementation written from the formula, and by hand."""

import math

import pytest
import torch

from onlinemix.losses import nt_xent


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
