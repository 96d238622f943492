"""Pair lookup for one trainer batch: ring first, then the staleness policy (wait, disk cache, real).

Every batch reports how its second views were obtained:
- fresh: a synthetic view from the ring, serving for the first time;
- cached: a synthetic view from the ring that has served before (within max_reuse and max_age);
- disk: an older variation read from the disk cache (no max_reuse or max_age there);
- fallback: no synthetic view in time, so a second augmented real view (plain SSL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from onlinemix.cache import CacheReader
from onlinemix.core.config import StalenessConfig
from onlinemix.exchange.ring import Loan, TakeResult, TrainerPort

POLL_S = 0.005
CACHE_REFRESH_S = 10.0


@dataclass(frozen=True)
class PairImages:
    """One batch's images in memory of its own (not the ring's): what view composition reads.

    Gathering a batch into these tensors is its one copy out of shared memory, so its ring
    slots can go back before augmentation; pinned-memory staging for the device belongs here.
    """
    real: torch.Tensor          # uint8 (B, 3, R, R)
    other: torch.Tensor         # uint8 (B, 3, R, R): the synthetic variation where is_synthetic, else the real image
    is_synthetic: torch.Tensor  # bool (B,)
    ids: torch.Tensor           # int64 (B,): the real images' ids (the supervised baseline's labels)

    @classmethod
    def real_only(cls, images: torch.Tensor, ids: np.ndarray) -> PairImages:
        """Each image as its own second view: no synthetic view in the batch."""
        real = images[torch.from_numpy(ids)]
        return cls(real, real, torch.zeros(len(ids), dtype=torch.bool), torch.from_numpy(ids).long())


@dataclass
class BatchPairs:
    """One batch's gathered images, how its second views were obtained, the disk cache's variations
    it took ((shard, row): the trainer counts their uses, which a resumed run continues from) and the
    ring slots it borrowed: ``with batch:`` (or :meth:`release`) hands them back; the images stay valid."""
    images: PairImages
    stats: dict[str, float] = field(default_factory=dict)
    loans: list[Loan] = field(default_factory=list, repr=False)
    from_cache: list[tuple[str, int]] = field(default_factory=list)

    def release(self) -> None:
        """Give the ring its slots back (the gathered images are a copy and stay valid)."""
        for loan in self.loans:
            loan.ring.give_back(loan)
        self.loans = []

    def __enter__(self) -> "BatchPairs":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class PairSource:
    """Builds (real, second view) batches: the ring first, then the staleness policy, which may
    turn to the disk cache. Offline there is no ring, and every view comes from the cache."""

    def __init__(self, ring: TrainerPort | None, staleness: StalenessConfig, images: torch.Tensor, verify: bool,
                 health_check: Callable[[], None], cache: CacheReader | None = None) -> None:
        self.ring = ring
        self.staleness = staleness
        self.images = images
        self.verify = verify
        self.health_check = health_check
        self.cache = cache
        self._refreshed = time.monotonic()

    def _borrow(self, ids: np.ndarray, positions: np.ndarray, epoch: int, skip: np.ndarray | None) -> Loan:
        return self.ring.borrow(ids, positions, epoch, max_reuse=self.staleness.max_reuse,
                                max_age=self.staleness.max_age, skip=skip, verify=self.verify)

    def get(self, ids: np.ndarray, positions: np.ndarray, epoch: int) -> BatchPairs:
        """The batch for these ids; use it in a ``with`` block so its ring slots are given back."""
        b = len(ids)
        loans: list[Loan] = []
        result, waited = TakeResult(*(np.zeros(b, dtype=t) for t in (bool, bool, np.int64, np.int64))), 0.0
        try:
            if self.ring is not None:
                loans.append(self._borrow(ids, positions, epoch, None))
                result, waited = self._wait_for_missing(ids, positions, epoch, loans)
        except BaseException:
            for loan in loans:
                self.ring.give_back(loan)
            raise
        pairs: dict[int, np.ndarray] = {i: loan.pair(i) for loan in loans for i in np.flatnonzero(loan.result.found)}
        real, other = self.gather(ids, pairs)
        disk, from_cache = self._from_cache(ids, epoch, result, other) if self.cache is not None else \
            (np.zeros(b, dtype=bool), [])
        synthetic = torch.from_numpy(result.found | disk)
        return BatchPairs(PairImages(real, other, synthetic, torch.from_numpy(ids).long()),
                          batch_stats(result, disk, waited), loans, from_cache)

    def gather(self, ids: np.ndarray, pairs: dict[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's (real, second) uint8 (B, 3, R, R) images: row i copied out of the ring's ``pairs[i]``
        where there is one, else the real image ``ids[i]`` twice, read from the images in one batch."""
        real = torch.empty((len(ids), *self.images.shape[1:]), dtype=torch.uint8)
        other = torch.empty_like(real)
        for i, pair in pairs.items():
            real[i], other[i] = torch.from_numpy(pair)
        rest = [i for i in range(len(ids)) if i not in pairs]
        if rest:
            real[rest] = self.images[torch.from_numpy(ids[rest])]
            other[rest] = real[rest]
        return real, other

    def _from_cache(self, ids: np.ndarray, epoch: int, result: TakeResult,
                    other: torch.Tensor) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Second views from the disk cache where the ring had none (policy ``cached``, ``wait`` after its
        timeout, and offline mode): the cache holds the synthetic image, the real one is already in the
        batch. ``result`` gets the age and reuse of the views served. Returns which rows came from the
        cache and the (shard, row) of each variation taken."""
        disk = np.zeros(len(ids), dtype=bool)
        taken: list[tuple[str, int]] = []
        if not reads_disk(self.staleness, online=self.ring is not None):
            return disk, taken
        if time.monotonic() - self._refreshed > CACHE_REFRESH_S:  # producers keep committing shards
            self.cache.refresh()
            self._refreshed = time.monotonic()
        missing = np.flatnonzero(~result.found)
        for i, served in zip(missing.tolist(), self.cache.take(ids[missing].tolist()), strict=True):
            if served is None:
                continue
            other[i] = served.image
            disk[i] = True
            taken.append((served.variation.shard, served.variation.row))
            result.age[i] = max(0, epoch - served.variation.epoch)
            result.uses[i] = served.uses
        return disk, taken

    def _wait_for_missing(self, ids: np.ndarray, positions: np.ndarray, epoch: int,
                          loans: list[Loan]) -> tuple[TakeResult, float]:
        """Under the ``wait`` policy, keep borrowing the ids still missing until the timeout."""
        result = TakeResult(*(a.copy() for a in (loans[0].result.found, loans[0].result.fresh,
                                                 loans[0].result.age, loans[0].result.uses)))
        if not waits(self.staleness) or result.found.all():
            return result, 0.0
        start = time.monotonic()
        missing = positions[~result.found]
        self.ring.request(int(missing.min()), int(missing.max()) + 1)
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


def waits(staleness: StalenessConfig) -> bool:
    """Whether a batch missing views waits for the producers (up to ``wait_timeout_s``) before the disk cache."""
    return staleness.policy == "wait"


def reads_disk(staleness: StalenessConfig, online: bool) -> bool:
    """Whether views the ring lacks come from the disk cache: offline always, online unless the policy is ``real``."""
    return not online or staleness.policy != "real"


def batch_stats(result: TakeResult, disk: np.ndarray, waited_s: float) -> dict[str, float]:
    """Counts of a batch's second views by origin, and the mean age and reuse of its synthetic ones."""
    ring, synthetic = result.found, result.found | disk
    n_ring, n_fresh, n_synthetic = int(ring.sum()), int(result.fresh.sum()), int(synthetic.sum())
    return {"fresh": n_fresh, "cached": n_ring - n_fresh, "disk": int(disk.sum()),
            "fallback": len(ring) - n_synthetic,
            "mean_age": float(result.age[synthetic].mean()) if n_synthetic else float("nan"),
            "mean_reuse": float(result.uses[synthetic].mean()) if n_synthetic else float("nan"),
            "wait_s": waited_s}
