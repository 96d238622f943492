"""Run metrics: how each batch's second views were obtained, per step and per epoch.

Step rows (every ``train.log_every`` steps) and epoch rows go to ``metrics.jsonl``; the
running totals feed the progress bar; each epoch ends with one log line.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from .files import json_text
from .producer import ProducerPool
from .ring import TrainerPort

log = logging.getLogger(__name__)

COUNTS = ("fresh", "cached", "disk", "fallback")
SYNTHETIC = ("fresh", "cached", "disk")


class RunMetrics:
    def __init__(self, path: Path | None, port: TrainerPort | None, pool: ProducerPool | None = None) -> None:
        self.file = open(path, "a") if path is not None else None
        self.port = port  # the ring's counters, None without producers
        self.pool = pool  # producer restarts and stalls, on the rank that started the producers
        self.totals = dict.fromkeys(COUNTS, 0)
        self._epoch = self._empty_epoch()
        self._started = time.monotonic()
        self._generated0 = port.generated if port else 0

    @staticmethod
    def _empty_epoch() -> dict[str, float]:
        return {**dict.fromkeys(COUNTS, 0), "age_sum": 0.0, "reuse_sum": 0.0, "wait_s": 0.0, "data_wait_s": 0.0,
                "steps": 0,
                "started": time.monotonic()}

    def producer_rate(self) -> float:
        if self.port is None:
            return 0.0
        return (self.port.generated - self._generated0) / max(1e-9, time.monotonic() - self._started)

    def _ring_state(self) -> dict[str, float]:
        if self.port is None:
            return {}
        return {**{f"ring_{k}": v for k, v in self.port.occupancy().items()},
                "checksum_errors": self.port.checksum_errors, "generated": self.port.generated,
                "evicted_unserved": self.port.evicted_unserved, "producer_busy_s": self.port.busy_s,
                "producer_restarts": self.pool.restarts if self.pool else 0,
                "producer_stalls": self.pool.stalls if self.pool else 0, "generated_per_s": self.producer_rate()}

    def record(self, step: int, epoch: int, stats: dict[str, float], data_wait_s: float, write: bool,
               **values: float) -> None:
        """Account one finished step; ``data_wait_s``: how long it waited for its input (the pipeline was
        behind); ``write`` also appends a step row."""
        e = self._epoch
        e["data_wait_s"] += data_wait_s
        synthetic = sum(stats[k] for k in SYNTHETIC)
        for k in COUNTS:
            self.totals[k] += stats[k]
            e[k] += stats[k]
        if synthetic:
            e["age_sum"] += stats["mean_age"] * synthetic
            e["reuse_sum"] += stats["mean_reuse"] * synthetic
        e["wait_s"] += stats["wait_s"]
        e["steps"] += 1
        if write and self.file:
            row = {"step": step, "epoch": epoch, **values, **stats, "data_wait_s": data_wait_s,
                   **{f"total_{k}": v for k, v in self.totals.items()},
                   **self._ring_state()}
            self._write(row)

    def end_epoch(self, epoch: int, **values: float) -> None:
        """Write the epoch row (with ``values``, e.g. the kNN accuracy) and its log line."""
        e = self._epoch
        if not e["steps"]:
            return
        synthetic = sum(e[k] for k in SYNTHETIC)
        row = {"epoch_end": epoch, **values, **{k: e[k] for k in COUNTS},
               "mean_age": e["age_sum"] / synthetic if synthetic else math.nan,
               "mean_reuse": e["reuse_sum"] / synthetic if synthetic else math.nan,
               "wait_s": e["wait_s"], "data_wait_s": e["data_wait_s"], "epoch_s": time.monotonic() - e["started"],
               **self._ring_state()}
        if self.file:
            self._write(row)
        log.info("epoch %d: %d fresh, %d cached, %d from disk, %d fallback; mean age %.2f epochs, mean reuse "
                 "%.2f; waited %.1fs of %.1fs", epoch, e["fresh"], e["cached"], e["disk"], e["fallback"], row["mean_age"],
                 row["mean_reuse"], e["wait_s"], row["epoch_s"])
        for name, label in (("knn", "kNN"), ("linear", "linear probe")):
            if f"{name}_top1" in values:
                log.info("epoch %d: %s top-1 %.2f%% on held-out real images", epoch, label, values[f"{name}_top1"])
        self._epoch = self._empty_epoch()

    def postfix(self, loss: float) -> dict[str, str | int]:
        out: dict[str, str | int] = {"loss": f"{loss:.3f}", **self.totals}
        if self.port is not None:
            out["gen"] = f"{self.producer_rate():.0f}/s"
            out["wait"] = f"{self._epoch['wait_s']:.0f}s"
        return out

    def _write(self, row: dict) -> None:
        self.file.write(json_text(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
