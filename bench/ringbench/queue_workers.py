"""The processes of a Queue run: the same producers and consumers as a ring run's, passing
(id, tensor) items through one ``torch.multiprocessing`` Queue instead."""

from __future__ import annotations

import queue as queue_module
import time
from types import ModuleType

import numpy as np

from .pairs import PairChecker, make_pool, pair_bytes, stamps
from .ring_workers import reporting, worker_start


def torch_setup(strategy: str) -> ModuleType:
    """torch for a Queue worker: one thread, and the sharing strategy of --sharing-strategy."""
    import torch
    import torch.multiprocessing as tmp

    torch.set_num_threads(1)
    if strategy != "default":
        tmp.set_sharing_strategy(strategy)
    return torch


def queue_producer(q, p: int, k: int, r: int, write_batch: int, seed: int, strategy: str, barrier, results, done,
                   timeout: float) -> None:
    """Put (id, tensor (2, 3, R, R) uint8) items for ids p*k .. p*k+k-1, then one None.

    Each item is allocated straight in shared memory (torch's own UntypedStorage._new_shared, what
    Tensor.share_memory_() uses) and filled with one copy, so pickling it for the Queue copies
    nothing more: the same number of copies as ring.write, the Queue's most favourable setup.
    """
    worker_start()
    with reporting(results, "producer", p):
        torch = torch_setup(strategy)
        pool = make_pool(seed, r, p, write_batch)
        id_words = stamps(pool)
        nbytes = pair_bytes(r)
        new_shared = getattr(torch.UntypedStorage, "_new_shared", None)

        def shared_tensor():
            if new_shared is None:
                return torch.empty((2, 3, r, r), dtype=torch.uint8).share_memory_()
            return torch.empty(0, dtype=torch.uint8).set_(new_shared(nbytes)).view(2, 3, r, r)

        barrier.wait(timeout)
        t_start = time.perf_counter()
        base = p * k
        for pos in range(k):
            j = pos % write_batch
            id_words[j] = base + pos
            t = shared_tensor()
            np.copyto(t.numpy(), pool[j])
            q.put((base + pos, t), timeout=timeout)
            del t
        q.put(None, timeout=timeout)
        results.put({"role": "producer", "index": p, "t_start": t_start, "t_end": time.perf_counter(),
                     "strategy": torch.multiprocessing.get_sharing_strategy(),
                     "allocation": "_new_shared" if new_shared else "share_memory_"})
        # With file descriptors, a consumer fetches each item's fd from this process: stay alive until all are in.
        done.wait(timeout)


def queue_consumer(q, c: int, n_producers: int, k: int, r: int, take_batch: int, expected, write_batch: int,
                   check_mode: str, strategy: str, sentinels, barrier, results, timeout: float, read: str) -> None:
    """Get items until every producer's None has been seen and check each one: in the received shared
    tensor itself (``read='in-place'``), or after copying it into a (take_batch, ...) buffer, the trainer's
    batch, as ring.take fills ``out`` (``read='copy'``)."""
    worker_start()
    with reporting(results, "consumer", c):
        torch_setup(strategy)
        check = PairChecker(expected, k, write_batch, check_mode)
        out = np.zeros((take_batch, 2, 3, r, r), dtype=np.uint8)
        received: list[int] = []
        bad = gets = empty_gets = 0
        row = 0
        barrier.wait(timeout)
        t_start = t_last = time.perf_counter()
        deadline = t_start + timeout
        while True:
            try:
                item = q.get(timeout=0.005)
            except queue_module.Empty:
                # Each producer's None follows all its items, so once all P are seen every item has been got.
                if sentinels.value >= n_producers:
                    break
                empty_gets += 1
                if time.perf_counter() > deadline:
                    raise TimeoutError("queue consumer past --timeout") from None
                continue
            gets += 1
            if item is None:
                with sentinels.get_lock():
                    sentinels.value += 1
                continue
            real_id, t = item
            if read == "copy":
                np.copyto(out[row], t.numpy())
                bad += not check(out[row], real_id)
            else:
                bad += not check(t.numpy(), real_id)
            del t, item
            received.append(real_id)
            row = (row + 1) % take_batch
            t_last = time.perf_counter()
        results.put({"role": "consumer", "index": c, "t_start": t_start, "t_last": t_last,
                     "received": np.asarray(received, dtype=np.int64), "bad": bad, "gets": gets,
                     "empty_gets": empty_gets, "check_s": check.seconds})
