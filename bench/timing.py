"""Clocks of the benchmarks: a span that waits for queued CUDA work, and the timing of several calls in
turns, so that a change in the background load during a run hits every one of them alike (every ratio the
benchmarks report is of calls timed this way)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Timer:
    """Wall-clock span that waits for queued CUDA work at both ends; ``with Timer(device) as t`` then ``t.seconds``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Timer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start


def in_turns(calls: tuple[Callable[[], float], ...], turns: int,
             after_each: Callable[[], None] = lambda: None) -> tuple[list[float], ...]:
    """The seconds each of ``calls`` (each times itself and returns its seconds) took in each of ``turns``
    turns; ``after_each`` runs after every turn (a progress bar's update). A warm-up is a call of this whose
    seconds are dropped."""
    times: tuple[list[float], ...] = tuple([] for _ in calls)
    for _ in range(turns):
        for call, seconds in zip(calls, times):
            seconds.append(call())
        after_each()
    return times


def timed(call: Callable[[], object]) -> Callable[[], float]:
    """``call`` timing itself on the wall clock (no CUDA synchronisation): it returns its seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0
    return run


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, timed in turns (a, b, c, a, b, c, ...)."""
    times = in_turns(tuple(timed(call) for call in calls.values()), repeats)
    return {name: statistics.median(t) for name, t in zip(calls, times)}
