"""The data order: a pure function of (seed, epoch), cut into full global batches."""

from __future__ import annotations

import numpy as np
import pytest

from onlinemix.core.schedule import EpochSchedule, variation_seed

# 103 non-contiguous ids, so ids and indices cannot be confused and 3 ids do not fit a full batch.
TRAIN_IDS = np.arange(0, 2 * 103, 2, dtype=np.int64) + 7
GLOBAL_BATCH = 10


def make(seed: int = 0, ids: np.ndarray = TRAIN_IDS, global_batch: int = GLOBAL_BATCH) -> EpochSchedule:
    return EpochSchedule(ids, global_batch, seed)


def epoch_order(s: EpochSchedule, epoch: int) -> np.ndarray:
    start = epoch * s.positions_per_epoch
    return s.ids_at(np.arange(start, start + s.positions_per_epoch))


def test_full_batches_only() -> None:
    s = make()
    assert s.steps_per_epoch == len(TRAIN_IDS) // GLOBAL_BATCH
    assert s.positions_per_epoch == s.steps_per_epoch * GLOBAL_BATCH
    assert s.positions_per_epoch <= len(TRAIN_IDS) < s.positions_per_epoch + GLOBAL_BATCH


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_epoch_is_permutation_of_subset_of_train_ids(epoch: int) -> None:
    s = make()
    order = epoch_order(s, epoch)
    assert len(order) == s.positions_per_epoch
    assert len(np.unique(order)) == len(order)  # no id twice in an epoch
    assert np.isin(order, TRAIN_IDS).all()


def test_same_seed_and_epoch_same_order() -> None:
    """A fresh schedule (as a producer process builds it) agrees with the trainer's."""
    for epoch in (0, 3):
        assert np.array_equal(epoch_order(make(seed=4), epoch), epoch_order(make(seed=4), epoch))


def test_order_is_shuffled_and_changes_with_epoch_and_seed() -> None:
    s = make()
    e0, e1 = epoch_order(s, 0), epoch_order(s, 1)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, np.sort(e0))  # actually shuffled
    assert not np.array_equal(e0, epoch_order(make(seed=1), 0))


def test_ids_at_spanning_two_epochs() -> None:
    s = make()
    ppe = s.positions_per_epoch
    positions = np.arange(ppe - 4, ppe + 4)
    got = s.ids_at(positions)
    expected = np.concatenate([epoch_order(s, 0)[-4:], epoch_order(s, 1)[:4]])
    assert np.array_equal(got, expected)
    assert list(s.epoch_of(positions)) == [0] * 4 + [1] * 4


def test_ids_at_is_order_independent() -> None:
    """Looking positions up in a shuffled, mixed-epoch order gives the same ids per position."""
    s = make()
    positions = np.arange(0, 3 * s.positions_per_epoch)
    reference = s.ids_at(positions)
    perm = np.random.default_rng(0).permutation(len(positions))
    assert np.array_equal(make().ids_at(positions[perm]), reference[perm])


def test_rank_positions_partition_the_global_batch() -> None:
    s = make()
    local = GLOBAL_BATCH // 2  # world size 2
    for step in (0, 1, s.steps_per_epoch):
        r0 = s.rank_positions(step, 0, local)
        r1 = s.rank_positions(step, 1, local)
        assert len(r0) == len(r1) == local
        assert set(r0.tolist()).isdisjoint(r1.tolist())
        global_batch = set(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))
        assert set(r0.tolist()) | set(r1.tolist()) == global_batch
        # And the ranks see different images.
        assert set(s.ids_at(r0).tolist()).isdisjoint(s.ids_at(r1).tolist())


def test_too_few_images_for_one_global_batch() -> None:
    with pytest.raises(ValueError, match="global batch"):
        make(ids=np.arange(9), global_batch=10)
    assert make(ids=np.arange(10), global_batch=10).steps_per_epoch == 1


# ----------------------------------------------------------------------------- variation seeds


def test_variation_seed_is_deterministic() -> None:
    assert variation_seed(3, 17, 2) == variation_seed(3, 17, 2)
    seed = variation_seed(0, 0, 0)
    assert isinstance(seed, int) and seed >= 0


def test_variation_seed_differs_across_ids_epochs_and_base_seed() -> None:
    seeds = {(b, i, e): variation_seed(b, i, e) for b in (0, 1) for i in range(50) for e in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert variation_seed(0, 5, 0) != variation_seed(0, 5, 1)
    assert variation_seed(0, 5, 0) != variation_seed(0, 6, 0)
    # Not symmetric in its arguments: (id, epoch) and (epoch, id) are different variations.
    assert variation_seed(0, 1, 2) != variation_seed(0, 2, 1)


def test_variation_seed_is_usable_by_torch() -> None:
    import torch

    torch.Generator().manual_seed(variation_seed(123, 10**6, 10**4))
