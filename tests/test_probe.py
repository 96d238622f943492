"""Probe maths: weighted kNN against a hand-written reference, top-k accuracy, the trained-vs-random-init probe."""

from __future__ import annotations

import math

import pytest
import torch

from onlinemix.core.config import load_config
from onlinemix.evaluation.probe import compare_with_random_init, format_probe, knn_scores, topk_accuracy
from onlinemix.methods.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the tiny network gains nothing from more threads


# ----------------------------------------------------------------------------- kNN and accuracy

def knn_reference(bank_x: torch.Tensor, bank_y: torch.Tensor, query_x: torch.Tensor, n_classes: int, k: int,
                  temperature: float) -> torch.Tensor:
    """Written from the definition, one query and one neighbour at a time."""
    out = torch.zeros(len(query_x), n_classes, dtype=torch.float64)
    for q in range(len(query_x)):
        sims = [float(torch.dot(query_x[q], b) / (query_x[q].norm() * b.norm())) for b in bank_x]
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:k]:
            out[q, int(bank_y[j])] += math.exp(sims[j] / temperature)
    return out


def test_knn_votes_hand_computed() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    # cos to (1,0) = 1/sqrt(1.01); to (1,1) = 1.1/sqrt(2.02); to (0,1) = 0.1/sqrt(1.01) is third, left out by k=2.
    s0, s2 = 1 / math.sqrt(1.01), 1.1 / math.sqrt(2.02)
    scores = knn_scores(bank, labels, query, n_classes=3, k=2, temperature=0.5)
    assert torch.allclose(scores, torch.tensor([[math.exp(s0 / 0.5), math.exp(s2 / 0.5), 0.0]]), rtol=1e-5)
    assert scores.argmax(1).item() == 0
    # k=3 and a flatter T=2: the third neighbour's vote (class 1) tips the balance to class 1.
    scores = knn_scores(bank, labels, query, n_classes=3, k=3, temperature=2.0)
    assert scores[0, 0] == pytest.approx(math.exp(s0 / 2), rel=1e-5)  # 1.645
    assert scores[0, 1] == pytest.approx(math.exp(s2 / 2) + math.exp(0.1 / math.sqrt(1.01) / 2), rel=1e-5)  # 2.524
    assert scores.argmax(1).item() == 1


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.1), (50, 1.0)])
def test_knn_matches_explicit_loop(k: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(k)
    bank, query = torch.randn(40, 6, generator=gen), torch.randn(13, 6, generator=gen)
    labels = torch.randint(0, 4, (40,), generator=gen)
    got = knn_scores(bank, labels, query, n_classes=4, k=k, temperature=temperature, chunk=5)
    want = knn_reference(bank.double(), labels, query.double(), 4, k, temperature)
    assert torch.allclose(got.double(), want, rtol=1e-4)


def test_knn_is_perfect_when_queries_are_the_bank() -> None:
    feats = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.randperm(50)  # every bank image its own class
    result = topk_accuracy(knn_scores(feats, labels, feats, 50, k=20, temperature=0.07), labels)
    assert result["top1"] == 100.0


def test_topk_accuracy_hand_computed() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],     # top-1 right
                           [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],     # second
                           [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])    # sixth: outside the top 5
    result = topk_accuracy(scores, torch.tensor([1, 1, 5]))
    assert result == pytest.approx({"top1": 100 / 3, "top5": 200 / 3})


def test_compare_with_random_init_keeps_its_shape() -> None:
    cfg = load_config(None, {"data.resolution": "16", "train.width": "8", "probe.epochs": "30"})
    results = compare_with_random_init(build_backbone(cfg.train), cfg, torch.device("cpu"))
    assert set(results) == {"trained", "random_init"} and set(results["trained"]) == {"top1", "top5"}
    assert "random_init" in format_probe(results)
