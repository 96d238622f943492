"""fraction_subset: the 25/50/100% real-data subsets are sized, reproducible, nested and class-balanced."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from onlinemix.data import fraction_subset

FRACTIONS = (0.25, 0.5, 1.0)


def shuffled_labels(sizes: list[int], seed: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_sizes_and_membership() -> None:
    train_ids = torch.arange(0, 2000, 2)  # ids need not be 0..n-1
    for fraction in FRACTIONS:
        sub = fraction_subset(train_ids, fraction, seed=0)
        assert len(sub) == round(fraction * 1000)
        assert len(sub.unique()) == len(sub) and torch.isin(sub, train_ids).all()
        assert torch.equal(sub, sub.sort().values)
    assert torch.equal(fraction_subset(train_ids, 1.0, seed=3), train_ids)
    assert len(fraction_subset(train_ids[:3], 0.01, seed=0)) == 1  # never empty


def test_deterministic_per_seed() -> None:
    train_ids = torch.arange(500)
    labels = shuffled_labels([100] * 5)
    for lab in (None, labels):
        assert torch.equal(fraction_subset(train_ids, 0.25, 7, lab), fraction_subset(train_ids, 0.25, 7, lab))
        assert not torch.equal(fraction_subset(train_ids, 0.25, 7, lab), fraction_subset(train_ids, 0.25, 8, lab))


@pytest.mark.parametrize("stratified", [False, True])
def test_subsets_are_nested(stratified: bool) -> None:
    train_ids = torch.arange(3, 603)
    labels = shuffled_labels([37, 150, 90, 200, 126]) if stratified else None
    grid = [i / 20 for i in range(1, 21)]
    for seed in range(5):
        subsets = [set(fraction_subset(train_ids, f, seed, labels).tolist()) for f in grid]
        assert all(small <= big for small, big in pairwise(subsets))
        assert subsets[grid.index(0.25)] <= subsets[grid.index(0.5)] <= subsets[-1]


def test_stratified_by_class() -> None:
    sizes = [5, 17, 40, 100, 3, 60, 8]
    labels = shuffled_labels(sizes, seed=1)
    train_ids = torch.arange(len(labels))
    for seed in range(10):
        for fraction in (0.1, 0.25, 0.5, 0.75):
            sub = fraction_subset(train_ids, fraction, seed, labels)
            assert len(sub) == round(fraction * len(train_ids))
            counts = torch.bincount(labels[sub], minlength=len(sizes))
            for c, n in enumerate(sizes):
                assert abs(counts[c].item() - fraction * n) <= 1, (seed, fraction, c, counts.tolist())


def test_stratification_uses_labels_by_image_id() -> None:
    # Train ids are the odd images; labels cover every image id. Each class has 8 train images.
    labels = torch.arange(48) // 16
    train_ids = torch.arange(1, 48, 2)
    for seed in range(10):
        sub = fraction_subset(train_ids, 0.25, seed, labels)
        assert torch.bincount(labels[sub], minlength=3).tolist() == [2, 2, 2]


def test_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fraction"):
        fraction_subset(torch.arange(10), 0.0, 0)
    with pytest.raises(ValueError, match="fraction"):
        fraction_subset(torch.arange(10), 1.5, 0)
    with pytest.raises(ValueError, match="indexed by image id"):
        fraction_subset(torch.arange(10, 20), 0.5, 0, labels=torch.zeros(10, dtype=torch.int64))
