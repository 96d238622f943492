"""--profile: the time a ring worker spends in flock (the ring's lock, waiting included) and in zlib.crc32
inside PairRing's own calls, counted by swapping the ring module's ``fcntl`` and ``crc32`` for counting
wrappers in that worker process only (the package itself is not changed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType
from typing import Any


def counted(fn: Callable, seconds: dict[str, float], key: str) -> Callable:
    """``fn``, also adding the wall time of every call to ``seconds[key]``."""
    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - t0
    return call


class CountedModule:
    """``module`` with its function ``fn`` ``counted`` into ``seconds[key]``; the rest of it as it is."""

    def __init__(self, module: ModuleType, fn: str, seconds: dict[str, float], key: str) -> None:
        self._module = module
        setattr(self, fn, counted(getattr(module, fn), seconds, key))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def profile_ring_module(seconds: dict[str, float]) -> None:
    """Count this worker's time in flock and in PairRing's crc32 into ``seconds["flock"]`` and ``["crc32"]``."""
    from onlinemix.exchange import ring as ring_module

    seconds.setdefault("flock", 0.0)
    seconds.setdefault("crc32", 0.0)
    ring_module.fcntl = CountedModule(ring_module.fcntl, "flock", seconds, "flock")
    ring_module.crc32 = counted(ring_module.crc32, seconds, "crc32")
