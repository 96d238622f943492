"""Shared-memory ring of (real, synthetic) uint8 image pairs.

Layout of one segment: a header of int64 counters, one int64 progress counter per producer
(:data:`MAX_PRODUCERS`), a table of int64 slot metadata, a float32 table of one row per real image
(its aim score and noise level, :class:`I`) and the pixel array ``(slots, 2, 3, R, R)`` uint8. Only
slot indices, counters and the image table ever move between processes. A producer writes each pair
into its slot once; a trainer borrows the slot, gathers the pixels into its batch and gives the slot back
before augmenting.

Concurrency: slot *state transitions* happen under an ``flock`` on the segment's own
file, which the kernel releases when a holder dies, so a killed process can never leave
the ring locked. Pixels are copied outside the lock: a writer owns a slot while it is
``WRITING`` (readers never look at it) and a reader *pins* a ``READY`` slot while it
has it on loan (writers never reuse a pinned slot). A slot whose writer died mid-write stays
``WRITING`` until someone notices the writer is gone and frees it; it is never served.
Each pair carries a CRC32 that readers can verify when they borrow it.

This module is the only one that reads or writes the segment. Trainers and producers talk
through it with two typed ports: :class:`TrainerPort` (publish position and speed, ask for
missing positions, borrow and give back; read producer readiness, fingerprint and counters)
and :class:`ProducerPort` (claim positions ahead of the trainers, write and publish pairs,
report readiness and the generator fingerprint). Header fields are attributes of
:class:`RingHeader`, declared once.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import resource
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
from isal.isal_zlib import crc32  # zlib's CRC32, same values, about 20x faster

from onlinemix.core.errors import UserError

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "onlinemix-"
MAGIC = 0x6F6E6C696E656D78  # "onlinemx"

FREE, WRITING, READY = 0, 1, 2
WRITE_RETRY_S = 0.005  # a producer waiting for a free slot polls this often
MAX_PRODUCERS = 64  # progress counters in a segment: one per producer of a node (config's gen_gpus <= 64)



class _Cell:
    """One int64 cell of the header, read and written as an attribute of :class:`RingHeader`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.index = len(owner.FIELDS)
        owner.FIELDS += (name,)

    def __get__(self, header: RingHeader | None, owner: type) -> int:
        return self if header is None else int(header.cells[self.index])  # type: ignore[return-value]

    def __set__(self, header: RingHeader, value: int) -> None:
        header.cells[self.index] = value


class RingHeader:
    """The segment's header: one int64 per field, each an attribute (``header.trainer_pos``).

    Fields are declared once, here; ``__slots__`` makes a misspelt field an ``AttributeError``
    instead of a silently new attribute. Written without the lock where one process owns the
    field (a trainer's position and speed); read-modify-write under the ring's lock.
    """

    __slots__ = ("cells",)
    FIELDS: tuple[str, ...] = ()

    magic = _Cell()
    slots = _Cell()
    resolution = _Cell()
    creator_pid = _Cell()
    # trainers -> producers
    trainer_pos = _Cell()         # the first position no trainer has asked for yet
    trainer_pos_ns = _Cell()      # when it was published, on the ring's clock: the trainers' lookup phase
    trainer_rate_milli = _Cell()  # the trainers' smoothed speed, positions per 1000 s
    urgent_start = _Cell()        # positions [urgent_start, urgent_end) a waiting trainer needs first
    urgent_end = _Cell()
    closed = _Cell()              # 1: no more work; producers exit
    # producers -> trainers
    gen_pos = _Cell()             # the next position no producer has claimed
    generated = _Cell()           # pairs published since the ring was created
    evicted_unserved = _Cell()    # published pairs whose slot was taken back before they ever served
    busy_ms = _Cell()             # producers' time on batches (claim to publication), waits for a free slot excluded
    checksum_errors = _Cell()     # corrupt pairs found (and dropped) by readers
    ready_producers = _Cell()     # producers that loaded their generator
    fingerprint = _Cell()         # their generator fingerprint (16 hex digits), once one is ready
    budget_used = _Cell()         # pairs claimed under producer.max_pairs_per_epoch (ProducerPort.take_budget)
    images = _Cell()              # rows of the image table: the real images' ids are its indices

    def __init__(self, cells: np.ndarray) -> None:
        self.cells = cells


class S:
    """Columns of the slot table: one int64 row per slot."""
    state, real_id, position, seed, birth_epoch, birth_ns, uses, pins, writer_pid, checksum, noise_milli = range(11)
    COUNT = 11


class I:  # noqa: E742 (the image table's columns, as S is the slot table's)
    """Columns of the image table: one float32 row per real image, written by the trainers and read by the
    producers without a lock (a torn read of one float is impossible; a stale one only delays its effect)."""
    score, noise = range(2)
    COUNT = 2

class RingError(UserError, RuntimeError):
    """The ring cannot be created or attached."""


def noise_in_milli(noises) -> np.ndarray:
    """Noise levels as the slot table keeps them: integer thousandths."""
    return np.rint(np.asarray(noises, dtype=np.float64) * 1000).astype(np.int64)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ring_nbytes(slots: int, resolution: int, images: int = 0) -> int:
    return (8 * len(RingHeader.FIELDS) + 8 * MAX_PRODUCERS + 8 * S.COUNT * slots + _image_table_nbytes(images)
            + slots * 2 * 3 * resolution * resolution)


def _image_table_nbytes(images: int) -> int:
    """The image table, padded to 8 bytes so that the pixels after it stay aligned."""
    return -(-4 * I.COUNT * images // 8) * 8


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
class Claim:
    """Positions claimed by a producer: it may generate for at most ``most`` of them (all, unless aimed)."""
    positions: np.ndarray   # int64, consecutive
    most: int


@dataclass
class Loan:
    """Pairs lent by :meth:`PairRing.borrow`: pinned slots, read in place until given back."""
    ring: PairRing
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

    def __init__(self, buf: memoryview | bytearray, shm: shared_memory.SharedMemory | None = None,
                 owner: bool = False) -> None:
        self.shm = shm
        self.owner = owner
        cells = np.ndarray((len(RingHeader.FIELDS),), dtype=np.int64, buffer=buf)
        self.header = RingHeader(cells)
        if self.header.magic != MAGIC:
            raise RingError(f"shared-memory segment {self.name} is not an onlinemix ring")
        self.slots = self.header.slots
        self.resolution = self.header.resolution
        offset = cells.nbytes
        # Bumped by each producer whenever its loop turns (a claim, a wait for a free slot); frozen
        # while it generates a batch, or when it is stopped or hangs: see ProducerPool's watch.
        self.progress = np.ndarray((MAX_PRODUCERS,), dtype=np.int64, buffer=buf, offset=offset)
        offset += self.progress.nbytes
        self.meta = np.ndarray((self.slots, S.COUNT), dtype=np.int64, buffer=buf, offset=offset)
        offset += self.meta.nbytes
        images = self.header.images
        self.image_table = np.ndarray((images, I.COUNT), dtype=np.float32, buffer=buf, offset=offset)
        offset += _image_table_nbytes(images)
        r = self.resolution
        self.pixels = np.ndarray((self.slots, 2, 3, r, r), dtype=np.uint8, buffer=buf, offset=offset)
        # Across processes the segment's own file is locked too; a local ring needs only the thread lock.
        self._lock_fd = os.open(SHM_DIR / shm.name, os.O_RDWR) if shm is not None else -1
        self._thread_lock = threading.Lock()
        self.clock_ns = time.time_ns  # birth times: the simulator swaps in its virtual clock

    # ------------------------------------------------------------------ lifetime
    @staticmethod
    def _initialise(buf: memoryview | bytearray, slots: int, resolution: int, images: int, noise: float) -> None:
        cells = np.ndarray((len(RingHeader.FIELDS),), dtype=np.int64, buffer=buf)
        cells[:] = 0
        header = RingHeader(cells)
        header.slots, header.resolution, header.creator_pid, header.images = slots, resolution, os.getpid(), images
        counters = np.ndarray((MAX_PRODUCERS + slots * S.COUNT,), dtype=np.int64, buffer=buf, offset=cells.nbytes)
        counters[:] = 0
        table = np.ndarray((images, I.COUNT), dtype=np.float32, buffer=buf, offset=cells.nbytes + counters.nbytes)
        table[:, I.score] = np.inf  # no image has a variation yet: every aim ranks it first
        table[:, I.noise] = noise
        header.magic = MAGIC  # last: a reader never sees a half-initialised ring as valid

    @classmethod
    def create(cls, slots: int, resolution: int, images: int = 0, noise: float = 0.0) -> PairRing:
        """A new segment of ``slots`` pairs at ``resolution``, with an image table of ``images`` rows (the real
        images' ids index it) whose noise levels start at ``noise``."""
        nbytes = ring_nbytes(slots, resolution, images)
        if not SHM_DIR.is_dir():
            raise RingError(f"{SHM_DIR} does not exist: the ring needs POSIX shared memory (Linux)")
        free = shutil.disk_usage(SHM_DIR).free
        if nbytes > free:
            raise RingError(
                f"the ring needs {nbytes / 2**20:.1f} MiB of shared memory but {SHM_DIR} has "
                f"{free / 2**20:.1f} MiB free; lower ring.slots or data.resolution, or give the "
                f"container more (docker run --shm-size={max(1, nbytes * 2 // 2**30 + 1)}g)")
        file_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if file_limit != resource.RLIM_INFINITY and nbytes > file_limit:  # the segment is a file of that size
            raise RingError(f"the ring needs {nbytes / 2**20:.1f} MiB of shared memory but this process may write "
                            f"files of at most {file_limit / 2**20:.1f} MiB (ulimit -f); lower ring.slots or "
                            "data.resolution, or raise the limit")
        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        except OSError as e:
            raise RingError(f"cannot create the ring's {nbytes / 2**20:.1f} MiB of shared memory in {SHM_DIR} "
                            f"({e.strerror or e}); lower ring.slots or data.resolution") from e
        cls._initialise(shm.buf, slots, resolution, images, noise)
        return cls(shm.buf, shm, owner=True)

    @classmethod
    def local(cls, slots: int, resolution: int = 1, images: int = 0, noise: float = 0.0) -> PairRing:
        """A ring in this process's own memory, with the same slot rules: what the simulator runs
        (``onlinemix.tools.simulate``) on a virtual clock, with 1-pixel pairs."""
        buf = bytearray(ring_nbytes(slots, resolution, images))
        cls._initialise(buf, slots, resolution, images, noise)
        return cls(buf)

    @classmethod
    def attach(cls, name: str) -> PairRing:
        try:
            shm = _attach_untracked(name)
            return cls(shm.buf, shm)
        except FileNotFoundError:
            raise RingError(f"ring {name} does not exist (its creator has exited?)") from None

    @property
    def name(self) -> str:
        return self.shm.name if self.shm is not None else "local"

    def close(self) -> None:
        """Detach; the creator also unlinks the segment. Safe to call twice."""
        if not hasattr(self, "header"):
            return
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        del self.header, self.progress, self.meta, self.image_table, self.pixels
        if self.shm is None:
            return
        self.shm.close()
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._lock_fd < 0:
                yield
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ header
    @property
    def closed(self) -> bool:
        return bool(self.header.closed)

    def mark_closed(self) -> None:
        """No more work: producers finish their batch and exit, and writers waiting for a slot give up."""
        self.header.closed = 1

    def producer_progress(self, index: int) -> int:
        """How often producer ``index`` has turned its loop (:meth:`ProducerPort.beat`)."""
        return int(self.progress[index])

    def occupancy(self) -> dict[str, int]:
        states = self.meta[:, S.state]
        return {"free": int((states == FREE).sum()), "writing": int((states == WRITING).sum()),
                "ready": int((states == READY).sum())}

    # ------------------------------------------------------------------ producer side
    def _by_id(self, slots: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Group ``slots`` by real id, freshest first: the candidates of ``ids[i]`` are
        ``slots[first[i]:last[i]]`` of the returned order (a sort, not a Python dict per call)."""
        m = self.meta
        slots = slots[np.lexsort((-m[slots, S.birth_ns], m[slots, S.real_id]))]
        slot_ids = m[slots, S.real_id]
        return slots, np.searchsorted(slot_ids, ids, "left"), np.searchsorted(slot_ids, ids, "right")

    def has_unused_view(self, ids: np.ndarray, positions: np.ndarray, epochs: np.ndarray, max_age: int) -> np.ndarray:
        """For each (id, position): is a never-served view that could serve it already in the ring?"""
        m = self.meta
        unused, first, last = self._by_id(np.flatnonzero((m[:, S.state] == READY) & (m[:, S.uses] == 0)), ids)
        out = np.zeros(len(ids), dtype=bool)
        for i in np.flatnonzero(last > first):
            rows = m[unused[first[i]:last[i]]]
            out[i] = bool(((rows[:, S.position] <= positions[i]) & (epochs[i] - rows[:, S.birth_epoch] <= max_age)).any())
        return out

    def waiting(self, trainer_pos: int) -> int:
        """Pairs published for positions the trainers have not reached yet that have never served:
        the slots a producer's claims ahead of the trainers hold (call under the lock)."""
        m = self.meta
        return int(((m[:, S.state] == READY) & (m[:, S.uses] == 0) & (m[:, S.position] >= trainer_pos)).sum())

    def reserve(self, n: int, epoch: int, max_age: int) -> list[int]:
        """Take up to ``n`` slots for writing, least valuable first: free slots, slots of dead
        writers, pairs too old to serve in ``epoch``, then pairs for positions the trainers
        have passed: those whose image has a newer pair first, then already-served ones,
        oldest first. Pinned pairs and pairs for positions still ahead of the trainers are
        never taken."""
        with self.locked():
            m = self.meta
            state = m[:, S.state]
            # A freed slot may still be pinned by a reader of a corrupt pair: not reusable yet.
            picked = list(np.flatnonzero((state == FREE) & (m[:, S.pins] == 0))[:n])
            if len(picked) < n:
                for slot in np.flatnonzero(state == WRITING):
                    if len(picked) == n:
                        break
                    if not _pid_alive(int(m[slot, S.writer_pid])):
                        picked.append(slot)
            if len(picked) < n:
                evictable = (state == READY) & (m[:, S.pins] == 0)
                expired = evictable & (epoch - m[:, S.birth_epoch] > max_age)
                passed = evictable & ~expired & (m[:, S.position] < self.header.trainer_pos)
                evicted = list(np.flatnonzero(expired)[: n - len(picked)])
                candidates = np.flatnonzero(passed)
                superseded = self._superseded(state == READY)[candidates]
                order = np.lexsort((m[candidates, S.birth_ns], m[candidates, S.uses] == 0, ~superseded))
                evicted += list(candidates[order][: n - len(picked) - len(evicted)])
                self.header.evicted_unserved += int((m[evicted, S.uses] == 0).sum())
                picked += evicted
            pid = os.getpid()
            for slot in picked:
                m[slot, S.state] = WRITING
                m[slot, S.writer_pid] = pid
                m[slot, S.pins] = 0
        return [int(s) for s in picked]

    def _superseded(self, ready: np.ndarray) -> np.ndarray:
        """Ready pairs whose image has a newer ready pair: the first to give up their slot."""
        out = np.zeros(self.slots, dtype=bool)
        idx = np.flatnonzero(ready)
        if len(idx) < 2:
            return out
        ids = self.meta[idx, S.real_id]
        order = np.lexsort((self.meta[idx, S.birth_ns], ids))
        sorted_ids = ids[order]
        out[idx[order[:-1]]] = sorted_ids[:-1] == sorted_ids[1:]
        return out

    def write(self, slot: int, real: np.ndarray, synthetic: np.ndarray) -> int:
        """Copy one pair into a reserved slot; returns its checksum (pass it to ``publish``)."""
        self.pixels[slot, 0] = real
        self.pixels[slot, 1] = synthetic
        return crc32(self.pixels[slot])

    def publish(self, slot: int, *, real_id: int, position: int, seed: int, birth_epoch: int, checksum: int,
                noise: float = 0.0) -> None:
        self.publish_many([slot], real_ids=[real_id], positions=[position], seeds=[seed],
                          birth_epochs=[birth_epoch], checksums=[checksum], noises=[noise])

    def publish_many(self, slots: list[int], *, real_ids, positions, seeds, birth_epochs, checksums,
                     noises=None) -> None:
        """Make written slots ``READY``, a whole batch in one locked step: one lock round trip per
        batch instead of per pair, which matters when trainers hold the lock often. ``noises``: the
        noise level each variation was made with (None: 0), kept in thousandths."""
        slots = np.asarray(slots, dtype=np.int64)
        m = self.meta
        noise_milli = np.zeros(len(slots), dtype=np.int64) if noises is None else noise_in_milli(noises)
        with self.locked():
            for column, values in ((S.real_id, real_ids), (S.position, positions), (S.seed, seeds),
                                   (S.birth_epoch, birth_epochs), (S.checksum, checksums),
                                   (S.noise_milli, noise_milli)):
                m[slots, column] = values
            m[slots, S.birth_ns] = self.clock_ns()
            m[slots, S.uses] = 0
            m[slots, S.pins] = 0
            m[slots, S.state] = READY
            self.header.generated += len(slots)

    def release(self, slots: list[int]) -> None:
        """Give back reserved slots that will not be written after all."""
        with self.locked():
            for slot in slots:
                self.meta[slot, S.state] = FREE

    # ------------------------------------------------------------------ trainer side
    def borrow(self, ids: np.ndarray, positions: np.ndarray, epoch: int, *, max_reuse: int, max_age: int,
               skip: np.ndarray | None = None, verify: bool = True) -> Loan:
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
        with self.locked():
            ok = ((m[:, S.state] == READY) & (m[:, S.uses] + m[:, S.pins] < max_reuse)
                  & (epoch - m[:, S.birth_epoch] <= max_age))
            candidates, first, last = self._by_id(np.flatnonzero(ok), ids)
            # Plain lists: the loop below runs per request, and numpy scalar access would dominate it.
            made_for = m[candidates, S.position].tolist()
            room = (max_reuse - m[candidates, S.uses] - m[candidates, S.pins]).tolist()
            wanted = positions.tolist()
            for i in (np.flatnonzero(last > first) if skip is None else np.flatnonzero((last > first) & ~skip)):
                for j in range(first[i], last[i]):
                    if made_for[j] <= wanted[i] and room[j] > 0:
                        slots[i] = candidates[j]
                        room[j] -= 1
                        break
            found = slots >= 0
            np.add.at(m[:, S.pins], slots[found], 1)
            rows = m[np.maximum(slots, 0)]
            uses = np.where(found, rows[:, S.uses], 0)
            age = np.where(found, epoch - rows[:, S.birth_epoch], 0)
        if verify:
            corrupt = np.array([s >= 0 and crc32(self.pixels[s]) != m[s, S.checksum] for s in slots.tolist()],
                               dtype=bool)
            if corrupt.any():
                self._drop_corrupt(slots[corrupt])
                slots[corrupt] = -1
                found = slots >= 0
        return Loan(self, slots, max_reuse, TakeResult(found, found & (uses == 0), age, uses))

    def _drop_corrupt(self, slots: np.ndarray) -> None:
        with self.locked():
            for slot in slots.tolist():
                self.meta[slot, S.pins] -= 1
                self.meta[slot, S.state] = FREE
                self.header.checksum_errors += 1

    def give_back(self, loan: Loan) -> None:
        """Unpin a loan's slots and count one use of each; a pair that reached its use limit is freed."""
        m = self.meta
        lent = loan.slots[loan.slots >= 0]
        with self.locked():
            np.subtract.at(m[:, S.pins], lent, 1)
            np.add.at(m[:, S.uses], lent, 1)
            done = lent[(m[lent, S.uses] >= loan.max_reuse) & (m[lent, S.pins] == 0)]
            m[done, S.state] = FREE
        loan.slots = np.full_like(loan.slots, -1)

    @contextmanager
    def borrowed(self, ids: np.ndarray, positions: np.ndarray, epoch: int, **kwargs) -> Iterator[Loan]:
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


# ---------------------------------------------------------------------- the handshake

class Ewma:
    """An exponentially smoothed measurement (the trainers' speed, a producer's batch time)."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.value: float | None = None

    def update(self, sample: float) -> float:
        self.value = sample if self.value is None else (1 - self.smoothing) * self.value + self.smoothing * sample
        return self.value


def _fingerprint_cell(fingerprint: str) -> int:
    """A 16-hex-digit generator fingerprint as the signed int64 a header cell holds."""
    if len(fingerprint) != 16:
        raise ValueError(f"expected a fingerprint of 16 hex digits, got {fingerprint!r}")
    value = int(fingerprint, 16)
    return value - 2**64 if value >= 2**63 else value


class TrainerPort:
    """The trainers' end of the ring: they publish where they are and how fast they go, ask for
    positions they are waiting for, and borrow pairs; they read the producers' readiness, their
    generator's fingerprint (the disk cache key) and counters.

    Every trainer rank of a node holds one; only the ``leader`` (the node's local main rank)
    publishes position and speed: ranks step in lockstep, so one voice is the truth.
    """

    def __init__(self, ring: PairRing, leader: bool) -> None:
        self.ring = ring
        self.leader = leader
        self._speed = Ewma()

    def publish_position(self, position: int) -> None:
        """The first position no trainer has asked for yet: producers claim ahead of it, and pairs
        for earlier positions become evictable."""
        if self.leader:
            self.ring.header.trainer_pos_ns = self.ring.clock_ns()
            self.ring.header.trainer_pos = position

    def publish_speed(self, positions: int, seconds: float) -> None:
        """One step moved ``positions`` in ``seconds`` (waiting included): producers plan their lead with it."""
        speed = self._speed.update(positions / max(seconds, 1e-6))
        if self.leader:
            self.ring.header.trainer_rate_milli = int(1000 * speed)

    def request(self, start: int, end: int) -> None:
        """A trainer waits for views of positions [start, end): producers claim those first."""
        with self.ring.locked():
            self.ring.header.urgent_start, self.ring.header.urgent_end = start, end

    def borrow(self, ids: np.ndarray, positions: np.ndarray, epoch: int, **kwargs) -> Loan:
        """:meth:`PairRing.borrow`: the freshest acceptable pair of each id, lent in place."""
        return self.ring.borrow(ids, positions, epoch, **kwargs)

    def give_back(self, loan: Loan) -> None:
        self.ring.give_back(loan)

    def publish_scores(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Set the aim scores of images ``ids``: producers short of time generate for the highest first.
        Written without the lock; every rank writes its own rows (an image is in one rank's batch at a time)."""
        self.ring.image_table[ids, I.score] = scores

    def noise_levels(self, ids: np.ndarray) -> np.ndarray:
        """The noise level the next variation of each image in ``ids`` will be made with."""
        return self.ring.image_table[ids, I.noise].copy()

    def publish_noise(self, ids: np.ndarray, levels: np.ndarray) -> None:
        """Set the noise level of the next variation of images ``ids`` (without the lock, as the scores)."""
        self.ring.image_table[ids, I.noise] = levels

    @property
    def ready_producers(self) -> int:
        return self.ring.header.ready_producers

    @property
    def fingerprint(self) -> str | None:
        """The producers' generator fingerprint, None until one of them is ready."""
        if self.ready_producers == 0:
            return None
        return f"{self.ring.header.fingerprint % 2**64:016x}"

    @property
    def generated(self) -> int:
        return self.ring.header.generated

    @property
    def checksum_errors(self) -> int:
        return self.ring.header.checksum_errors

    @property
    def evicted_unserved(self) -> int:
        """Published pairs whose slot was taken back before they ever served (generation the ring wasted)."""
        return self.ring.header.evicted_unserved

    @property
    def unserved(self) -> int:
        """Published pairs in the ring that have never served."""
        with self.ring.locked():
            return self.ring.waiting(0)

    @property
    def busy_s(self) -> float:
        """Seconds producers spent on batches, waits for a free slot excluded (see ``ProducerPort.count_busy``)."""
        return self.ring.header.busy_ms / 1000

    def occupancy(self) -> dict[str, int]:
        return self.ring.occupancy()


class ProducerPort:
    """A producer's end of the ring: it claims the positions the trainers will need by the time
    its batch is ready, skips images that already have an unused view, writes and publishes
    pairs, and reports that it is ready and with which generator.

    Lead: the trainers move ``rate`` positions per second (they publish it), ``trainer_batch`` at a time,
    and a batch takes ``batch_s`` seconds here (measured, smoothed), so claims start at the first trainer
    batch they will look up after ``batch_s * lead_factor`` seconds (0 = at the trainers), however far
    that is: past the ring's size and into later epochs when generation is much slower than training.
    What bounds a claim is room, not distance: the unserved pairs waiting ahead of the trainers plus
    the claim must fit in ``capacity`` slots (the ring less the trainers' batch and the other
    producers' batches in flight).
    """

    def __init__(self, ring: PairRing, capacity: int, lead_factor: float, index: int = 0,
                 trainer_batch: int = 0, producers: int = 1) -> None:
        if not 0 <= index < MAX_PRODUCERS:
            raise RingError(f"producer index {index} out of range: a ring serves at most {MAX_PRODUCERS} producers")
        self.ring = ring
        self.capacity = capacity
        self.trainer_batch = trainer_batch  # positions the trainers look up at once (the node's batch)
        self.lead_factor = lead_factor
        self.index = index
        self.producers = producers  # of the node: they share the positions the trainers pass
        self._batch_s = Ewma()
        self._slot_wait_s = 0.0  # waits for a free slot since the last count_busy

    def beat(self) -> None:
        """This producer's loop turned: it is alive and not stuck (its parent watches the counter)."""
        self.ring.progress[self.index] += 1

    @property
    def closed(self) -> bool:
        return self.ring.closed

    def report_ready(self, fingerprint: str) -> None:
        """This producer loaded its generator; every producer of a ring must make the same images."""
        cell = _fingerprint_cell(fingerprint)
        with self.ring.locked():
            header = self.ring.header
            if header.ready_producers and header.fingerprint != cell:
                raise RingError(f"this producer's generator fingerprint {fingerprint} differs from "
                                f"{header.fingerprint % 2**64:016x}, reported by another producer: "
                                "producers of one run must use identical generators and devices")
            header.fingerprint = cell
            header.ready_producers += 1

    def observe_batch(self, seconds: float) -> None:
        """A full batch took ``seconds`` from claim to publication."""
        self._batch_s.update(seconds)

    def lead(self) -> int:
        """Positions ahead of the trainers where claims start: 0 with ``lead_factor`` 0, and until a batch has
        been timed and the trainers have moved (the first pairs go where the trainers are)."""
        rate = self.ring.header.trainer_rate_milli / 1000.0
        if not (self.lead_factor and rate and self._batch_s.value):
            return 0
        ready_in = self._batch_s.value * self.lead_factor  # seconds until a batch claimed now is published
        if not self.trainer_batch:
            return int(rate * ready_in)
        return self.trainer_batch * self._batches_looked_up_within(ready_in, rate)

    def _batches_looked_up_within(self, seconds: float, rate: float) -> int:
        """Trainer batches looked up within ``seconds`` from now. The trainers take ``trainer_batch``
        positions at once, one batch every ``trainer_batch / rate`` seconds, the next one a step after they
        last published their position; a pair for a batch looked up before it is ready comes too late."""
        step_s = self.trainer_batch / rate
        since = max(0.0, (self.ring.clock_ns() - self.ring.header.trainer_pos_ns) / 1e9)
        return max(0, math.ceil((seconds + since) / step_s - 1))

    def passed_per_batch(self) -> float:
        """Positions the trainers pass while this producer makes one batch, its share among the node's producers
        (0 until a batch has been timed and the trainers have moved)."""
        rate = self.ring.header.trainer_rate_milli / 1000.0
        if not (rate and self._batch_s.value):
            return 0.0
        return rate * self._batch_s.value / self.producers

    def claim(self, n: int, positions_per_pair: float = 0.0) -> Claim:
        """Reserve positions to generate for, at most ``n`` of them; may return fewer or none.

        Positions a trainer is waiting for (:meth:`TrainerPort.request`) come first. Otherwise
        claims continue from where the last one ended, but never start closer to the trainers
        than the lead, and only as many as fit next to the unserved pairs already waiting
        (:meth:`PairRing.waiting`): a full ring of pairs nobody has asked for yet stops claims,
        whatever their distance from the trainers. With ``positions_per_pair`` above 1 (aim: the positions
        the trainers pass for each pair the producers can make), a claim reaches as many positions per pair
        beyond the lead, of which the producer generates for the most deserving: the others are passed over
        for good. Where earlier claims reach already (they spanned more than the trainers passed meanwhile)
        it spans less, down to its pairs alone; so claims keep the trainers' pace and never run away to the
        end of training.
        """
        self.beat()
        lead = self.lead()
        with self.ring.locked():
            header = self.ring.header
            trainer = header.trainer_pos
            urgent_start = max(header.urgent_start, trainer)
            urgent_end = header.urgent_end
            if urgent_start < urgent_end:
                end = min(urgent_start + n, urgent_end)
                header.urgent_start = end
                if urgent_start <= header.gen_pos < end:  # claimed now: the next claim must not make them again
                    header.gen_pos = end
                return Claim(np.arange(urgent_start, end, dtype=np.int64), end - urgent_start)
            start = max(header.gen_pos, trainer + lead)
            most = min(n, self.capacity - self.ring.waiting(trainer))
            if most <= 0:
                return Claim(np.empty(0, dtype=np.int64), 0)
            span = max(most, trainer + lead + int(most * positions_per_pair) - start)
            header.gen_pos = start + span
        return Claim(np.arange(start, start + span, dtype=np.int64), most)

    @property
    def trainer_position(self) -> int:
        """The first position no trainer has asked for yet (:meth:`TrainerPort.publish_position`)."""
        return self.ring.header.trainer_pos

    @property
    def budget_used(self) -> int:
        """Pairs the node's producers have claimed under a budget (:meth:`take_budget`)."""
        return self.ring.header.budget_used

    def take_budget(self, wanted: int, allowed: int) -> int:
        """Count up to ``wanted`` pairs against a budget of ``allowed`` pairs so far for the node's producers;
        returns how many may be generated now."""
        with self.ring.locked():
            granted = max(0, min(wanted, allowed - self.ring.header.budget_used))
            self.ring.header.budget_used += granted
        return granted

    def scores(self, ids: np.ndarray) -> np.ndarray:
        """The trainers' aim scores of images ``ids`` (read without the lock)."""
        return self.ring.image_table[ids, I.score].copy()

    def noise_levels(self, ids: np.ndarray) -> np.ndarray:
        """The noise level the trainers set for the next variation of each image in ``ids``."""
        return self.ring.image_table[ids, I.noise].copy()

    def has_unused_view(self, ids: np.ndarray, positions: np.ndarray, epochs: np.ndarray, max_age: int) -> np.ndarray:
        return self.ring.has_unused_view(ids, positions, epochs, max_age)

    def place(self, real: np.ndarray, synthetic: np.ndarray, ids: np.ndarray, positions: np.ndarray,
              seeds: list[int], epochs: np.ndarray, max_age: int, noises: np.ndarray | None = None) -> int:
        """Write and publish the first pairs given, as many as slots can be reserved for now
        (:meth:`PairRing.reserve`: least valuable first); returns how many (0: the ring is full)."""
        ring = self.ring
        slots = ring.reserve(len(ids), int(epochs[0]), max_age)
        if not slots:
            return 0
        n = len(slots)
        checksums = [ring.write(slot, real[j], synthetic[j]) for j, slot in enumerate(slots)]
        ring.publish_many(slots, real_ids=ids[:n], positions=positions[:n], seeds=seeds[:n],
                          birth_epochs=epochs[:n], checksums=checksums, noises=None if noises is None else noises[:n])
        return n

    def write_pairs(self, real: np.ndarray, synthetic: np.ndarray, ids: np.ndarray, positions: np.ndarray,
                    seeds: list[int], epochs: np.ndarray, max_age: int, noises: np.ndarray | None = None) -> int:
        """Write and publish pairs as slots become free; waits (until the ring closes) while it is full.
        Returns how many were written: fewer than given when the ring closed first."""
        i = 0
        while i < len(ids):
            self.beat()
            if self.ring.closed:
                return i
            written = self.place(real[i:], synthetic[i:], ids[i:], positions[i:], seeds[i:], epochs[i:], max_age,
                                 None if noises is None else noises[i:])
            if not written:
                started = time.perf_counter()
                time.sleep(WRITE_RETRY_S)
                self._slot_wait_s += time.perf_counter() - started
            i += written
        return i

    def count_busy(self, seconds: float) -> None:
        """A batch took ``seconds`` from claim to publication: add them, less the time spent waiting for a
        free slot, to the ring's ``busy_ms``, so that generated / busy time is the producers' real rate."""
        busy, self._slot_wait_s = max(0.0, seconds - self._slot_wait_s), 0.0
        with self.ring.locked():
            self.ring.header.busy_ms += round(1000 * busy)
