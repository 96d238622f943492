"""Recycled output tensors: handed out again only when nothing shares their storage."""

from __future__ import annotations

import pytest
import torch

from onlinemix.views.buffers import MIN_BYTES, RecycledTensors

BIG = (4, 3, 160, 160)  # 1.2 MB of float32: above MIN_BYTES


def test_a_released_tensor_is_handed_out_again() -> None:
    assert torch.empty(BIG).nbytes >= MIN_BYTES
    pool = RecycledTensors()
    first = pool.empty(BIG)
    address = first.data_ptr()
    del first
    assert pool.empty(BIG).data_ptr() == address


@pytest.mark.parametrize("hold", ["tensor", "view", "row", "storage", "numpy"])
def test_a_tensor_still_referenced_is_never_reused(hold: str) -> None:
    pool = RecycledTensors()
    first = pool.empty(BIG)
    first.fill_(7.0)
    held = {"tensor": lambda t: t, "view": lambda t: t.view(-1), "row": lambda t: t[1],
            "storage": lambda t: t.untyped_storage(), "numpy": lambda t: t.numpy()}[hold](first)
    address = first.data_ptr()
    del first
    second = pool.empty(BIG)
    assert second.data_ptr() != address
    second.fill_(0.0)
    assert held is not None
    if hold != "storage":
        assert float(torch.as_tensor(held).min()) == 7.0  # what the holder sees is untouched
    del held
    assert pool.empty(BIG).data_ptr() == address  # released now: the older one comes back


def test_shapes_and_dtypes_are_kept_apart_and_small_tensors_are_not_kept() -> None:
    pool = RecycledTensors()
    address = pool.empty(BIG).data_ptr()
    assert pool.empty((4, 3, 160, 159)).data_ptr() != address
    assert pool.empty((8, 3, 160, 160), torch.float16).dtype == torch.float16
    assert pool.empty((2, 3, 8, 8)).shape == (2, 3, 8, 8)
    assert [(t.shape, t.dtype) for t, _ in pool.kept] == [(BIG, torch.float32), ((4, 3, 160, 159), torch.float32),
                                                          ((8, 3, 160, 160), torch.float16)]


def test_capacity_drops_the_least_recently_used() -> None:
    pool = RecycledTensors(capacity=2)
    held = [pool.empty(BIG) for _ in range(3)]  # all in use: the first one is dropped from the pool
    assert [t.data_ptr() for t, _ in pool.kept] == [h.data_ptr() for h in held[1:]]
    with pytest.raises(ValueError, match="capacity"):
        RecycledTensors(capacity=0)
