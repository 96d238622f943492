"""Pair lookup for one trainer batch: ring first, then the staleness policy (wait, disk cache, real).

:class:`BatchLookup` is the lookup as steps that never block: borrow what the ring has, ask the producers
for what is missing, borrow again, then serve what is still missing from the disk cache or let it fall
back to a real view. :class:`PairSource` drives it for a trainer, sleeping between polls;
:mod:`onlinemix.tools.simulate` drives the same steps on a virtual clock. Every batch reports where its
second views came from, a :class:`ViewOrigin` each.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Protocol

import numpy as np
import torch

from onlinemix.cache import CacheReader, Served
from onlinemix.core.config import StalenessConfig
from onlinemix.exchange.ring import Loan, TakeResult, TrainerPort

POLL_S = 0.005
CACHE_REFRESH_S = 10.0


class ViewOrigin(str, Enum):
    """Where a batch's second view came from. The value names its counter in metrics, plans and simulations."""
    FRESH = "fresh"        # a synthetic view from the ring, serving for the first time
    CACHED = "cached"      # a synthetic view from the ring that has served before (within max_reuse and max_age)
    DISK = "disk"          # an older variation read from the disk cache (no max_reuse or max_age there)
    FALLBACK = "fallback"  # no synthetic view in time: a second augmented real view (plain SSL)


ORIGINS = tuple(origin.value for origin in ViewOrigin)  # the counters, in report order
SYNTHETIC_ORIGINS = ORIGINS[:-1]


class VariationSource(Protocol):
    """The disk cache as a lookup reads it: :class:`~onlinemix.cache.CacheReader`, or the simulator's model."""

    def take(self, real_ids: Iterable[int]) -> list[Served | None]: ...


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


@dataclass(frozen=True)
class SecondViews:
    """Per row of a batch, what its second view was: what the trainers' aim scores read (onlinemix/exchange/aim.py)."""
    ids: np.ndarray        # int64 (B,): the real images
    synthetic: np.ndarray  # bool (B,): a synthetic variation (ring or disk), not a fallback
    uses: np.ndarray       # int (B,): times that variation had served before (where synthetic)
    age: np.ndarray        # int (B,): epochs since it was made (where synthetic)

    @classmethod
    def of(cls, ids: np.ndarray, result: TakeResult, disk: np.ndarray) -> SecondViews:
        return cls(ids, result.found | disk, result.uses.copy(), result.age.copy())


@dataclass
class BatchPairs:
    """One batch's gathered images, how its second views were obtained (counts, and per row), the disk
    cache's variations it took ((shard, row): the trainer counts their uses, which a resumed run continues
    from) and the ring slots it borrowed: ``with batch:`` (or :meth:`release`) hands them back; the images
    stay valid."""
    images: PairImages
    stats: dict[str, float] = field(default_factory=dict)
    loans: list[Loan] = field(default_factory=list, repr=False)
    from_cache: list[tuple[str, int]] = field(default_factory=list)
    second: SecondViews | None = None  # None: no second view was looked up (plain SSL)

    @classmethod
    def real_only(cls, images: torch.Tensor, ids: np.ndarray) -> BatchPairs:
        """A batch of plain SSL (or a real phase of the pairing): no second view is counted."""
        return cls(PairImages.real_only(images, ids), batch_stats(no_views(0), np.zeros(0, dtype=bool), 0.0))

    def release(self) -> None:
        """Give the ring its slots back (the gathered images are a copy and stay valid)."""
        for loan in self.loans:
            loan.ring.give_back(loan)
        self.loans = []

    def __enter__(self) -> "BatchPairs":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class BatchLookup:
    """One batch's lookup in the ring, as steps that never block.

    Created, it borrows the freshest acceptable pair of every id. Under the ``wait`` policy
    (:meth:`should_wait`) a driver asks the producers for the missing positions (:meth:`request_missing`)
    and polls (:meth:`poll`) until the batch is :attr:`complete` or its deadline passes. The loans stay
    pinned until :meth:`release`: the trainer copies its pairs out first; the simulator has no pixels.
    """

    def __init__(self, port: TrainerPort, ids: np.ndarray, positions: np.ndarray, epoch: int,
                 staleness: StalenessConfig, verify: bool) -> None:
        self.port, self.ids, self.positions, self.epoch = port, ids, positions, epoch
        self.staleness, self.verify = staleness, verify
        first = self._borrow(None)
        self.loans: list[Loan] = [first]
        self.result = TakeResult(*(a.copy() for a in (first.result.found, first.result.fresh, first.result.age,
                                                       first.result.uses)))

    def _borrow(self, skip: np.ndarray | None) -> Loan:
        return self.port.borrow(self.ids, self.positions, self.epoch, max_reuse=self.staleness.max_reuse,
                                max_age=self.staleness.max_age, skip=skip, verify=self.verify)

    @property
    def complete(self) -> bool:
        return bool(self.result.found.all())

    def should_wait(self) -> bool:
        """Whether the policy waits for the producers before the disk cache (``wait``, with views missing)."""
        return waits(self.staleness) and not self.complete

    def request_missing(self) -> None:
        """Ask the producers to claim the missing positions first."""
        missing = self.positions[~self.result.found]
        self.port.request(int(missing.min()), int(missing.max()) + 1)

    def poll(self) -> bool:
        """Borrow the views still missing; whether any arrived."""
        loan = self._borrow(self.result.found)
        more = loan.result
        if not more.found.any():
            return False
        self.loans.append(loan)
        result = self.result
        result.age = np.where(more.found, more.age, result.age)
        result.uses = np.where(more.found, more.uses, result.uses)
        result.fresh |= more.fresh
        result.found |= more.found
        return True

    def pairs(self) -> dict[int, np.ndarray]:
        """Row -> its borrowed (2, 3, R, R) pair in shared memory, valid until :meth:`release`."""
        return {i: loan.pair(i) for loan in self.loans for i in np.flatnonzero(loan.result.found)}

    def served(self) -> list[tuple[int, int]]:
        """(image id, epoch the view was made for) of every view the ring served."""
        found = np.flatnonzero(self.result.found)
        return list(zip(self.ids[found].tolist(), (self.epoch - self.result.age[found]).tolist(), strict=True))

    def release(self) -> None:
        """Give the loans back to the ring (each counts one use of its pairs)."""
        for loan in self.loans:
            self.port.give_back(loan)
        self.loans = []


def serve_from_cache(cache: VariationSource, ids: np.ndarray, epoch: int, result: TakeResult,
                     other: torch.Tensor | None) -> tuple[np.ndarray, list[Served]]:
    """Second views from the disk cache for the rows ``result`` has none: which rows it served, and the
    variations served (their images into ``other``, unless None). Their age and reuse go into ``result``."""
    disk = np.zeros(len(ids), dtype=bool)
    taken: list[Served] = []
    missing = np.flatnonzero(~result.found)
    for i, served in zip(missing.tolist(), cache.take(ids[missing].tolist()), strict=True):
        if served is None:
            continue
        if other is not None:
            other[i] = served.image
        disk[i] = True
        taken.append(served)
        result.age[i] = max(0, epoch - served.variation.epoch)
        result.uses[i] = served.uses
    return disk, taken


def no_views(b: int) -> TakeResult:
    """The ring's answer where there is no ring (offline): nothing found for any of ``b`` rows."""
    return TakeResult(*(np.zeros(b, dtype=t) for t in (bool, bool, np.int64, np.int64)))


class PairSource:
    """Builds (real, second view) batches for a trainer: :class:`BatchLookup` in the ring, waiting as the
    policy says, then the disk cache. Offline there is no ring, and every view comes from the cache."""

    def __init__(self, ring: TrainerPort | None, staleness: StalenessConfig, images: torch.Tensor, verify: bool,
                 health_check: Callable[[], None], cache: CacheReader | None = None) -> None:
        self.ring = ring
        self.staleness = staleness
        self.images = images
        self.verify = verify
        self.health_check = health_check
        self.cache = cache
        self._refreshed = time.monotonic()

    def get(self, ids: np.ndarray, positions: np.ndarray, epoch: int) -> BatchPairs:
        """The batch for these ids; use it in a ``with`` block so its ring slots are given back."""
        if self.ring is None:
            result, pairs, loans, waited = no_views(len(ids)), {}, [], 0.0
        else:
            lookup = BatchLookup(self.ring, ids, positions, epoch, self.staleness, self.verify)
            try:
                waited = self._wait(lookup) if lookup.should_wait() else 0.0
            except BaseException:
                lookup.release()
                raise
            result, pairs, loans = lookup.result, lookup.pairs(), lookup.loans
        real, other = self.gather(ids, pairs)
        disk, taken = np.zeros(len(ids), dtype=bool), []
        if self.cache is not None and reads_disk(self.staleness, online=self.ring is not None):
            if time.monotonic() - self._refreshed > CACHE_REFRESH_S:  # producers keep committing shards
                self.cache.refresh()
                self._refreshed = time.monotonic()
            disk, taken = serve_from_cache(self.cache, ids, epoch, result, other)
        synthetic = torch.from_numpy(result.found | disk)
        return BatchPairs(PairImages(real, other, synthetic, torch.from_numpy(ids).long()),
                          batch_stats(result, disk, waited), loans,
                          [(s.variation.shard, s.variation.row) for s in taken], SecondViews.of(ids, result, disk))

    def _wait(self, lookup: BatchLookup) -> float:
        """The ``wait`` policy: poll for the missing views until they are all there or the timeout passes."""
        start = time.monotonic()
        lookup.request_missing()
        deadline = start + self.staleness.wait_timeout_s
        while not lookup.complete and time.monotonic() < deadline:
            self.health_check()
            time.sleep(POLL_S)
            lookup.poll()
        return time.monotonic() - start

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
    return {ViewOrigin.FRESH.value: n_fresh, ViewOrigin.CACHED.value: n_ring - n_fresh,
            ViewOrigin.DISK.value: int(disk.sum()), ViewOrigin.FALLBACK.value: len(ring) - n_synthetic,
            "mean_age": float(result.age[synthetic].mean()) if n_synthetic else float("nan"),
            "mean_reuse": float(result.uses[synthetic].mean()) if n_synthetic else float("nan"),
            "wait_s": waited_s}
