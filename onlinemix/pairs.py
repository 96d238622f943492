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
from .ring import PairRing, TakeResult

POLL_S = 0.005


@dataclass
class BatchPairs:
    real: torch.Tensor            # uint8 (B, 3, R, R)
    other: torch.Tensor           # uint8 (B, 3, R, R): synthetic where is_synthetic, else the real image again
    is_synthetic: torch.Tensor    # bool (B,)
    stats: dict[str, float] = field(default_factory=dict)


class PairSource:
    """Builds (real, second view) batches from the ring under a staleness policy."""

    def __init__(self, ring: PairRing, staleness: StalenessConfig, images: torch.Tensor, verify: bool,
                 health_check: Callable[[], None]) -> None:
        self.ring = ring
        self.staleness = staleness
        self.images = images
        self.verify = verify
        self.health_check = health_check
        r = ring.resolution
        self._buffer = np.empty((0, 2, 3, r, r), dtype=np.uint8)

    def _take(self, ids: np.ndarray, positions: np.ndarray, epoch: int, skip: np.ndarray | None):
        return self.ring.take(ids, positions, epoch, self._buffer[: len(ids)], max_reuse=self.staleness.max_reuse,
                              max_age=self.staleness.max_age, skip=skip, verify=self.verify)

    def get(self, ids: np.ndarray, positions: np.ndarray, epoch: int) -> BatchPairs:
        b = len(ids)
        if self._buffer.shape[0] < b:
            self._buffer = np.empty((b, *self._buffer.shape[1:]), dtype=np.uint8)
        result = self._take(ids, positions, epoch, None)
        waited = 0.0
        if self.staleness.policy == "wait" and not result.found.all():
            start = time.monotonic()
            missing = positions[~result.found]
            self.ring.request_urgent(int(missing.min()), int(missing.max()) + 1)
            deadline = start + self.staleness.wait_timeout_s
            while not result.found.all() and time.monotonic() < deadline:
                self.health_check()
                time.sleep(POLL_S)
                more = self._take(ids, positions, epoch, result.found)
                for name in ("age", "uses"):
                    setattr(result, name, np.where(more.found, getattr(more, name), getattr(result, name)))
                result.fresh |= more.fresh
                result.found |= more.found
            waited = time.monotonic() - start
        found = torch.from_numpy(result.found)[:, None, None, None]
        pairs = torch.from_numpy(self._buffer[:b].copy())
        real = torch.where(found, pairs[:, 0], self.images[torch.from_numpy(ids)])
        other = torch.where(found, pairs[:, 1], real)
        return BatchPairs(real, other, torch.from_numpy(result.found), batch_stats(result, waited))


def batch_stats(result: TakeResult, waited_s: float) -> dict[str, float]:
    found = result.found
    n_found, n_fresh = int(found.sum()), int(result.fresh.sum())
    return {"fresh": n_fresh, "cached": n_found - n_fresh, "fallback": len(found) - n_found,
            "mean_age": float(result.age[found].mean()) if n_found else float("nan"),
            "mean_reuse": float(result.uses[found].mean()) if n_found else float("nan"),
            "wait_s": waited_s}
