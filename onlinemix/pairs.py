"""Pair lookup for one trainer batch: ring first, then the staleness policy.

Every batch reports how its second views were obtained:
- fresh: a synthetic view serving for the first time;
- cached: a synthetic view generated earlier that has served before (within max_reuse and max_age);
- fallback: no acceptable synthetic view in time, so a second augmented real view (plain SSL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .config import StalenessConfig
from .ring import Loan, PairRing, TakeResult

POLL_S = 0.005


@dataclass
class BatchPairs:
    """One batch's (real, second view) images, each a uint8 (3, R, R) tensor.

    Views that came from the ring are read in place from shared memory: use them inside
    ``with batch:`` (or call :meth:`release`), which hands their slots back to the ring.
    """
    real: list[torch.Tensor]
    other: list[torch.Tensor]     # synthetic where is_synthetic, else the real image again
    is_synthetic: torch.Tensor    # bool (B,)
    stats: dict[str, float] = field(default_factory=dict)
    loans: list[Loan] = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Give the ring its slots back; the batch's images are no longer valid afterwards."""
        self.real, self.other = [], []
        for loan in self.loans:
            loan.ring.give_back(loan)
        self.loans = []

    def __enter__(self) -> "BatchPairs":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class PairSource:
    """Builds (real, second view) batches from the ring under a staleness policy."""

    def __init__(self, ring: PairRing, staleness: StalenessConfig, images: torch.Tensor, verify: bool,
                 health_check: Callable[[], None]) -> None:
        self.ring = ring
        self.staleness = staleness
        self.images = images
        self.verify = verify
        self.health_check = health_check

    def _borrow(self, ids: np.ndarray, positions: np.ndarray, epoch: int, skip: np.ndarray | None) -> Loan:
        return self.ring.borrow(ids, positions, epoch, max_reuse=self.staleness.max_reuse,
                                max_age=self.staleness.max_age, skip=skip, verify=self.verify)

    def get(self, ids: np.ndarray, positions: np.ndarray, epoch: int) -> BatchPairs:
        """The batch for these ids; use it in a ``with`` block so its ring slots are given back."""
        loans = [self._borrow(ids, positions, epoch, None)]
        try:
            result, waited = self._wait_for_missing(ids, positions, epoch, loans)
        except BaseException:
            for loan in loans:
                self.ring.give_back(loan)
            raise
        real, other = [], []
        pair_of = {i: loan for loan in loans for i in np.flatnonzero(loan.result.found).tolist()}
        for i, real_id in enumerate(ids.tolist()):
            if i in pair_of:
                pair = torch.from_numpy(pair_of[i].pair(i))
                real.append(pair[0])
                other.append(pair[1])
            else:
                real.append(self.images[real_id])
                other.append(self.images[real_id])
        return BatchPairs(real, other, torch.from_numpy(result.found.copy()), batch_stats(result, waited), loans)

    def _wait_for_missing(self, ids: np.ndarray, positions: np.ndarray, epoch: int,
                          loans: list[Loan]) -> tuple[TakeResult, float]:
        """Under the ``wait`` policy, keep borrowing the ids still missing until the timeout."""
        result = TakeResult(*(a.copy() for a in (loans[0].result.found, loans[0].result.fresh,
                                                 loans[0].result.age, loans[0].result.uses)))
        if self.staleness.policy != "wait" or result.found.all():
            return result, 0.0
        start = time.monotonic()
        missing = positions[~result.found]
        self.ring.request_urgent(int(missing.min()), int(missing.max()) + 1)
        deadline = start + self.staleness.wait_timeout_s
        while not result.found.all() and time.monotonic() < deadline:
            self.health_check()
            time.sleep(POLL_S)
            loan = self._borrow(ids, positions, epoch, result.found)
            more = loan.result
            if not more.found.any():
                continue
            loans.append(loan)
            result.age = np.where(more.found, more.age, result.age)
            result.uses = np.where(more.found, more.uses, result.uses)
            result.fresh |= more.fresh
            result.found |= more.found
        return result, time.monotonic() - start


def batch_stats(result: TakeResult, waited_s: float) -> dict[str, float]:
    found = result.found
    n_found, n_fresh = int(found.sum()), int(result.fresh.sum())
    return {"fresh": n_fresh, "cached": n_found - n_fresh, "fallback": len(found) - n_found,
            "mean_age": float(result.age[found].mean()) if n_found else float("nan"),
            "mean_reuse": float(result.uses[found].mean()) if n_found else float("nan"),
            "wait_s": waited_s}
