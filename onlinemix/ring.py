"""Shared-memory ring of (real, synthetic) uint8 image pairs.

Layout of one segment: a header of int64 counters, a table of int64 slot metadata and
the pixel array ``(slots, 2, 3, R, R)`` uint8. Only slot indices and counters ever move
between processes. A producer writes each pair into its slot once; a trainer borrows the
slot and its augmentation reads the pixels in place, so a pair is copied once in all.

Concurrency: slot *state transitions* happen under an ``flock`` on the segment's own
file, which the kernel releases when a holder dies, so a killed process can never leave
the ring locked. Pixels are copied outside the lock: a writer owns a slot while it is
``WRITING`` (readers never look at it) and a reader *pins* a ``READY`` slot while it
has it on loan (writers never reuse a pinned slot). A slot whose writer died mid-write stays
``WRITING`` until someone notices the writer is gone and frees it; it is never served.
Each pair carries a CRC32 that readers can verify when they borrow it.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Iterator

import numpy as np
from isal.isal_zlib import crc32  # zlib's CRC32, same values, about 20x faster

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "onlinemix-"
MAGIC = 0x6F6E6C696E656D78  # "onlinemx"

FREE, WRITING, READY = 0, 1, 2

HEADER = ("magic", "slots", "resolution", "creator_pid", "trainer_pos", "trainer_rate_milli", "gen_pos",
          "urgent_start", "urgent_end", "closed", "generated", "generate_ns", "checksum_errors", "ready_producers")
SLOT = ("state", "real_id", "position", "seed", "birth_epoch", "birth_ns", "uses", "pins",
        "writer_pid", "checksum")
H = {name: i for i, name in enumerate(HEADER)}
S = {name: i for i, name in enumerate(SLOT)}


class RingError(RuntimeError):
    """The ring cannot be created or attached."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ring_nbytes(slots: int, resolution: int) -> int:
    return 8 * len(HEADER) + 8 * len(SLOT) * slots + slots * 2 * 3 * resolution * resolution


def remove_stale_segments() -> list[str]:
    """Unlink ring segments whose creating process no longer exists (left by a killed run)."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob(f"{NAME_PREFIX}*"):
        match = re.match(rf"{NAME_PREFIX}(\d+)-", path.name)
        if match and not _pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with this process's resource tracker.

    Before Python 3.13 every attach registers the segment, and the tracker unlinks it
    when the *attaching* process exits, pulling the ring from under everyone else
    (CPython issue 82300). Only the creator should own the segment's lifetime.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


@dataclass
class TakeResult:
    """Which requested ids got a synthetic view, and what kind of view it was."""
    found: np.ndarray       # bool (B,)
    fresh: np.ndarray       # bool (B,): the view had never served before
    age: np.ndarray         # int (B,): epochs since the view was generated (valid where found)
    uses: np.ndarray        # int (B,): times the view had served before this request (valid where found)


@dataclass
class Loan:
    """Pairs lent by :meth:`PairRing.borrow`: pinned slots, read in place until given back."""
    ring: "PairRing"
    slots: np.ndarray       # int (B,): the slot lent for request i, -1 where none was found
    max_reuse: int
    result: TakeResult

    def pair(self, i: int) -> np.ndarray:
        """The (2, 3, R, R) uint8 pair of request i, a view of shared memory valid until given back."""
        if self.slots[i] < 0:
            raise KeyError(f"request {i} has no pair on loan")
        return self.ring.pixels[self.slots[i]]


class PairRing:
    """A fixed pool of pair slots in one shared-memory segment, usable from any process."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.shm = shm
        self.owner = owner
        header = np.ndarray((len(HEADER),), dtype=np.int64, buffer=shm.buf)
        if header[H["magic"]] != MAGIC:
            raise RingError(f"shared-memory segment {shm.name} is not an onlinemix ring")
        self.slots = int(header[H["slots"]])
        self.resolution = int(header[H["resolution"]])
        offset = header.nbytes
        self.header = header
        self.meta = np.ndarray((self.slots, len(SLOT)), dtype=np.int64, buffer=shm.buf, offset=offset)
        offset += self.meta.nbytes
        r = self.resolution
        self.pixels = np.ndarray((self.slots, 2, 3, r, r), dtype=np.uint8, buffer=shm.buf, offset=offset)
        self._lock_fd = os.open(SHM_DIR / shm.name, os.O_RDWR)
        self._thread_lock = threading.Lock()

    # ------------------------------------------------------------------ lifetime
    @classmethod
    def create(cls, slots: int, resolution: int) -> "PairRing":
        nbytes = ring_nbytes(slots, resolution)
        if not SHM_DIR.is_dir():
            raise RingError(f"{SHM_DIR} does not exist: the ring needs POSIX shared memory (Linux)")
        free = shutil.disk_usage(SHM_DIR).free
        if nbytes > free:
            raise RingError(
                f"the ring needs {nbytes / 2**20:.1f} MiB of shared memory but {SHM_DIR} has "
                f"{free / 2**20:.1f} MiB free; lower ring.slots or data.resolution, or give the "
                f"container more (docker run --shm-size={max(1, nbytes * 2 // 2**30 + 1)}g)")
        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        header = np.ndarray((len(HEADER),), dtype=np.int64, buffer=shm.buf)
        header[:] = 0
        header[H["slots"]], header[H["resolution"]] = slots, resolution
        header[H["creator_pid"]] = os.getpid()
        np.ndarray((slots, len(SLOT)), dtype=np.int64, buffer=shm.buf, offset=header.nbytes)[:] = 0
        header[H["magic"]] = MAGIC
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "PairRing":
        try:
            return cls(_attach_untracked(name), owner=False)
        except FileNotFoundError:
            raise RingError(f"ring {name} does not exist (its creator has exited?)") from None

    @property
    def name(self) -> str:
        return self.shm.name

    def close(self) -> None:
        """Detach; the creator also unlinks the segment. Safe to call twice."""
        if self._lock_fd < 0:
            return
        os.close(self._lock_fd)
        self._lock_fd = -1
        del self.header, self.meta, self.pixels
        self.shm.close()
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ counters
    def get(self, key: str) -> int:
        return int(self.header[H[key]])

    def set(self, key: str, value: int) -> None:
        self.header[H[key]] = value

    def add(self, key: str, value: int) -> None:
        with self._locked():
            self.header[H[key]] += value

    @property
    def closed(self) -> bool:
        return bool(self.header[H["closed"]])

    def occupancy(self) -> dict[str, int]:
        states = self.meta[:, S["state"]]
        return {"free": int((states == FREE).sum()), "writing": int((states == WRITING).sum()),
                "ready": int((states == READY).sum())}

    # ------------------------------------------------------------------ producer side
    def claim_positions(self, n: int, lookahead: int, lead: int = 0) -> np.ndarray:
        """Reserve up to ``n`` positions to generate for; may return fewer or none.

        ``trainer_pos`` is the first position no trainer has asked for yet. Positions a
        trainer is waiting for (see ``request_urgent``) come first. Otherwise claims
        continue from where the last one ended, but never start closer to the trainers than
        ``lead`` positions (where they will be once the variation is ready) and never reach
        more than ``lookahead`` positions ahead of them.
        """
        with self._locked():
            trainer = int(self.header[H["trainer_pos"]])
            urgent_start = max(int(self.header[H["urgent_start"]]), trainer)
            urgent_end = int(self.header[H["urgent_end"]])
            if urgent_start < urgent_end:
                end = min(urgent_start + n, urgent_end)
                self.header[H["urgent_start"]] = end
                return np.arange(urgent_start, end, dtype=np.int64)
            start = max(int(self.header[H["gen_pos"]]), trainer + min(lead, max(0, lookahead - n)))
            end = min(start + n, trainer + lookahead)
            if end <= start:
                return np.empty(0, dtype=np.int64)
            self.header[H["gen_pos"]] = end
        return np.arange(start, end, dtype=np.int64)

    def request_urgent(self, start: int, end: int) -> None:
        """A trainer waits for views of positions [start, end): producers claim those first."""
        with self._locked():
            self.header[H["urgent_start"]], self.header[H["urgent_end"]] = start, end

    def _by_id(self, slots: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Group ``slots`` by real id, freshest first: the candidates of ``ids[i]`` are
        ``slots[first[i]:last[i]]`` of the returned order (a sort, not a Python dict per call)."""
        m = self.meta
        slots = slots[np.lexsort((-m[slots, S["birth_ns"]], m[slots, S["real_id"]]))]
        slot_ids = m[slots, S["real_id"]]
        return slots, np.searchsorted(slot_ids, ids, "left"), np.searchsorted(slot_ids, ids, "right")

    def has_unused_view(self, ids: np.ndarray, positions: np.ndarray, epochs: np.ndarray, max_age: int) -> np.ndarray:
        """For each (id, position): is a never-served view that could serve it already in the ring?"""
        m = self.meta
        unused, first, last = self._by_id(np.flatnonzero((m[:, S["state"]] == READY) & (m[:, S["uses"]] == 0)), ids)
        out = np.zeros(len(ids), dtype=bool)
        for i in np.flatnonzero(last > first):
            rows = m[unused[first[i]:last[i]]]
            out[i] = bool(((rows[:, S["position"]] <= positions[i]) & (epochs[i] - rows[:, S["birth_epoch"]] <= max_age)).any())
        return out

    def reserve(self, n: int, epoch: int, max_age: int) -> list[int]:
        """Take up to ``n`` slots for writing, least valuable first: free slots, slots of dead
        writers, pairs too old to serve in ``epoch``, then pairs for positions the trainers
        have passed: those whose image has a newer pair first, then already-served ones,
        oldest first. Pinned pairs and pairs for positions still ahead of the trainers are
        never taken."""
        with self._locked():
            m = self.meta
            state = m[:, S["state"]]
            # A freed slot may still be pinned by a reader of a corrupt pair: not reusable yet.
            picked = list(np.flatnonzero((state == FREE) & (m[:, S["pins"]] == 0))[:n])
            if len(picked) < n:
                for slot in np.flatnonzero(state == WRITING):
                    if len(picked) == n:
                        break
                    if not _pid_alive(int(m[slot, S["writer_pid"]])):
                        picked.append(slot)
            if len(picked) < n:
                evictable = (state == READY) & (m[:, S["pins"]] == 0)
                expired = evictable & (epoch - m[:, S["birth_epoch"]] > max_age)
                passed = evictable & ~expired & (m[:, S["position"]] < self.header[H["trainer_pos"]])
                picked += list(np.flatnonzero(expired)[: n - len(picked)])
                candidates = np.flatnonzero(passed)
                superseded = self._superseded(state == READY)[candidates]
                order = np.lexsort((m[candidates, S["birth_ns"]], m[candidates, S["uses"]] == 0, ~superseded))
                picked += list(candidates[order][: n - len(picked)])
            pid = os.getpid()
            for slot in picked:
                m[slot, S["state"]] = WRITING
                m[slot, S["writer_pid"]] = pid
                m[slot, S["pins"]] = 0
        return [int(s) for s in picked]

    def _superseded(self, ready: np.ndarray) -> np.ndarray:
        """Ready pairs whose image has a newer ready pair: the first to give up their slot."""
        out = np.zeros(self.slots, dtype=bool)
        idx = np.flatnonzero(ready)
        if len(idx) < 2:
            return out
        ids = self.meta[idx, S["real_id"]]
        order = np.lexsort((self.meta[idx, S["birth_ns"]], ids))
        sorted_ids = ids[order]
        out[idx[order[:-1]]] = sorted_ids[:-1] == sorted_ids[1:]
        return out

    def write(self, slot: int, real: np.ndarray, synthetic: np.ndarray) -> int:
        """Copy one pair into a reserved slot; returns its checksum (pass it to ``publish``)."""
        self.pixels[slot, 0] = real
        self.pixels[slot, 1] = synthetic
        return crc32(self.pixels[slot])

    def publish(self, slot: int, *, real_id: int, position: int, seed: int, birth_epoch: int, checksum: int) -> None:
        self.publish_many([slot], real_ids=[real_id], positions=[position], seeds=[seed],
                          birth_epochs=[birth_epoch], checksums=[checksum])

    def publish_many(self, slots: list[int], *, real_ids, positions, seeds, birth_epochs, checksums) -> None:
        """Make written slots ``READY``, a whole batch in one locked step: one lock round trip per
        batch instead of per pair, which matters when trainers hold the lock often."""
        slots = np.asarray(slots, dtype=np.int64)
        m = self.meta
        with self._locked():
            for key, values in (("real_id", real_ids), ("position", positions), ("seed", seeds),
                                ("birth_epoch", birth_epochs), ("checksum", checksums)):
                m[slots, S[key]] = values
            m[slots, S["birth_ns"]] = time.time_ns()
            m[slots, S["uses"]] = 0
            m[slots, S["pins"]] = 0
            m[slots, S["state"]] = READY
            self.header[H["generated"]] += len(slots)

    def release(self, slots: list[int]) -> None:
        """Give back reserved slots that will not be written after all."""
        with self._locked():
            for slot in slots:
                self.meta[slot, S["state"]] = FREE

    # ------------------------------------------------------------------ trainer side
    def borrow(self, ids: np.ndarray, positions: np.ndarray, epoch: int, *, max_reuse: int, max_age: int,
               skip: np.ndarray | None = None, verify: bool = True) -> "Loan":
        """Pin the freshest acceptable pair of each id and lend it out in place, without copying.

        Acceptable for the request at ``positions[i]``: ready, generated for that position
        or an earlier one (a view made for a later occurrence of the image stays reserved
        for it), served fewer than ``max_reuse`` times, at most ``max_age`` epochs old.
        Entries where ``skip`` is true are not looked up. A pair whose checksum does not
        match is dropped from the ring and reported as not found.

        The lent pairs (``loan.pair(i)``) are views of shared memory: read them, then hand the
        loan back with :meth:`give_back`, which counts the use. Until then the slots are
        pinned: no writer reuses them and the pins count as uses against ``max_reuse``.
        """
        b = len(ids)
        slots = np.full(b, -1, dtype=np.int64)
        m = self.meta
        with self._locked():
            ok = ((m[:, S["state"]] == READY) & (m[:, S["uses"]] + m[:, S["pins"]] < max_reuse)
                  & (epoch - m[:, S["birth_epoch"]] <= max_age))
            candidates, first, last = self._by_id(np.flatnonzero(ok), ids)
            # Plain lists: the loop below runs per request, and numpy scalar access would dominate it.
            made_for = m[candidates, S["position"]].tolist()
            room = (max_reuse - m[candidates, S["uses"]] - m[candidates, S["pins"]]).tolist()
            wanted = positions.tolist()
            for i in (np.flatnonzero(last > first) if skip is None else np.flatnonzero((last > first) & ~skip)):
                for j in range(first[i], last[i]):
                    if made_for[j] <= wanted[i] and room[j] > 0:
                        slots[i] = candidates[j]
                        room[j] -= 1
                        break
            found = slots >= 0
            np.add.at(m[:, S["pins"]], slots[found], 1)
            rows = m[np.maximum(slots, 0)]
            uses = np.where(found, rows[:, S["uses"]], 0)
            age = np.where(found, epoch - rows[:, S["birth_epoch"]], 0)
        if verify:
            corrupt = np.array([s >= 0 and crc32(self.pixels[s]) != m[s, S["checksum"]] for s in slots.tolist()],
                               dtype=bool)
            if corrupt.any():
                self._drop_corrupt(slots[corrupt])
                slots[corrupt] = -1
                found = slots >= 0
        return Loan(self, slots, max_reuse, TakeResult(found, found & (uses == 0), age, uses))

    def _drop_corrupt(self, slots: np.ndarray) -> None:
        with self._locked():
            for slot in slots.tolist():
                self.meta[slot, S["pins"]] -= 1
                self.meta[slot, S["state"]] = FREE
                self.header[H["checksum_errors"]] += 1

    def give_back(self, loan: "Loan") -> None:
        """Unpin a loan's slots and count one use of each; a pair that reached its use limit is freed."""
        m = self.meta
        lent = loan.slots[loan.slots >= 0]
        with self._locked():
            np.subtract.at(m[:, S["pins"]], lent, 1)
            np.add.at(m[:, S["uses"]], lent, 1)
            done = lent[(m[lent, S["uses"]] >= loan.max_reuse) & (m[lent, S["pins"]] == 0)]
            m[done, S["state"]] = FREE
        loan.slots = np.full_like(loan.slots, -1)

    @contextmanager
    def borrowed(self, ids: np.ndarray, positions: np.ndarray, epoch: int, **kwargs) -> Iterator["Loan"]:
        """:meth:`borrow` for the length of a ``with`` block, given back on any exit."""
        loan = self.borrow(ids, positions, epoch, **kwargs)
        try:
            yield loan
        finally:
            self.give_back(loan)

    def take(self, ids: np.ndarray, positions: np.ndarray, epoch: int, out: np.ndarray, *, max_reuse: int,
             max_age: int, skip: np.ndarray | None = None, verify: bool = True) -> TakeResult:
        """:meth:`borrow`, copy each found pair into ``out[i]`` (shape (B, 2, 3, R, R)), give back."""
        with self.borrowed(ids, positions, epoch, max_reuse=max_reuse, max_age=max_age, skip=skip,
                           verify=verify) as loan:
            for i in np.flatnonzero(loan.result.found):
                out[i] = loan.pair(i)
            return loan.result
