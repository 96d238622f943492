"""The input pipeline: the next batches are made on a worker thread while the current step runs.

Making a batch means looking its pairs up (ring, staleness policy, disk cache), gathering them
into the batch's own uint8 tensors (the ring slots go back right there), composing the method's
views and, on a GPU, copying them to the device from pinned memory on a side stream. Done in the
training loop, all of that is serial with the step; here up to ``depth`` batches are made ahead.
torch releases the GIL in its kernels, so the worker thread overlaps the step's compute.

An exception on the worker thread is raised in the training loop, with its traceback, at the
step that needed the batch. :meth:`Prefetcher.close` stops the worker (Ctrl-C, a dead producer,
the end of training): the ``stop`` event it sets is what the pair lookup's waits check
(:func:`check_running`), so a worker waiting for a producer gives up within a poll and never
touches the ring after the loop has moved on. ``depth`` 0 makes every batch in the loop itself.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from onlinemix.core.devices import make_current
from onlinemix.exchange.lookup import SecondViews
from onlinemix.views.compose import Views

POLL_S = 0.1


@dataclass
class Prepared:
    """One step's input: its views (on the device when there is one), how its second views were
    obtained (``PairSource`` stats), the disk cache variations it took ((shard, row), counted by the
    trainer when the step runs) and the CUDA event the copy to the device recorded."""
    step: int
    views: Views
    stats: dict[str, float]
    from_cache: list[tuple[str, int]]
    copied: torch.cuda.Event | None = None
    second: SecondViews | None = None  # per row, what its second view was (for the aim scores)

    def wait(self) -> None:
        """Make the current CUDA stream wait for the copy, and keep the memory alive for it."""
        if self.copied is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self.copied)
            for tensor in (*self.views.images, *(() if self.views.labels is None else (self.views.labels,))):
                tensor.record_stream(stream)


def to_device(views: Views, device: torch.device, stream: torch.cuda.Stream | None) -> tuple[Views, torch.cuda.Event | None]:
    """``views`` on ``device``: on a GPU through pinned memory on ``stream`` (views a batched backend
    already made there stay), with an event the training loop waits for."""
    if device.type != "cuda" or stream is None:
        return views, None

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.is_cuda else tensor.pin_memory().to(device, non_blocking=True)

    with torch.cuda.stream(stream):
        on_device = Views([moved(v) for v in views.images], views.n_global,
                          None if views.labels is None else moved(views.labels))
        event = torch.cuda.Event()
        event.record(stream)
    return on_device, event


class PipelineStopped(Exception):
    """The input pipeline was closed while a batch was being made."""


def check_running(stop: threading.Event) -> None:
    """Raise :class:`PipelineStopped` once ``stop`` is set: called from the pair lookup's waits."""
    if stop.is_set():
        raise PipelineStopped


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Steps ``first`` .. ``last`` - 1 made by ``prepare(step)``, in order, up to ``depth`` ahead."""

    def __init__(self, prepare: Callable[[int], Prepared], first: int, last: int, depth: int,
                 stop: threading.Event, device: torch.device | None = None) -> None:
        self.prepare = prepare
        self.device = device  # the worker thread's current CUDA device (devices.make_current)
        self.next_step = first
        self.last = last
        self.depth = depth
        self._stop = stop
        self._queue: queue.Queue[Prepared | _Failure] = queue.Queue(maxsize=max(1, depth))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, args=(first,), name="onlinemix-prefetch", daemon=True)
            self._thread.start()

    def _run(self, first: int) -> None:
        try:
            if self.device is not None:
                make_current(self.device)
            for step in range(first, self.last):
                item = self.prepare(step)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=POLL_S)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except PipelineStopped:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
            self._queue.put(_Failure(e))

    def next(self) -> tuple[Prepared, float]:
        """The next step's input and the seconds the loop waited for it."""
        started = time.monotonic()
        if self._thread is None:
            item: Prepared | _Failure = self.prepare(self.next_step)
        else:
            item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        self.next_step += 1
        item.wait()
        return item, time.monotonic() - started

    def close(self) -> None:
        """Stop the worker thread; batches it made and nobody took are dropped."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    pass
            self._thread.join()
