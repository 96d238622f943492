"""Run metrics: how each batch's second views were obtained, per step and per epoch.

Step rows (every ``train.log_every`` steps) and epoch rows go to ``metrics.jsonl`` and, their
numbers, to the experiment tracker; the running totals feed the progress bar; each epoch ends
with one log line, and the run with a summary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from onlinemix.core.files import json_text
from onlinemix.exchange.lookup import ORIGINS, SYNTHETIC_ORIGINS
from onlinemix.exchange.ring import TrainerPort
from onlinemix.generation.producer import ProducerPool
from onlinemix.training.tracking import scalars

log = logging.getLogger(__name__)


class RunMetrics:
    def __init__(self, path: Path | None, port: TrainerPort | None, pool: ProducerPool | None = None,
                 tracker: Callable[[dict, int], None] | None = None) -> None:
        self.file = open(path, "a") if path is not None else None
        self.port = port  # the ring's counters, None without producers
        self.pool = pool  # producer restarts and stalls, on the rank that started the producers
        self.tracker = tracker  # each written row, e.g. Accelerator.log (rows go to metrics.jsonl either way)
        self.totals = dict.fromkeys(ORIGINS, 0)
        self._run = {"steps": 0, "step": 0, "wait_s": 0.0, "data_wait_s": 0.0, "step_s": 0.0}
        self._epoch = self._empty_epoch()
        self._started = time.monotonic()
        self._generated0 = port.generated if port else 0

    @staticmethod
    def _empty_epoch() -> dict[str, float]:
        return {**dict.fromkeys(ORIGINS, 0), "age_sum": 0.0, "reuse_sum": 0.0, "wait_s": 0.0, "data_wait_s": 0.0,
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
                "producer_stalls": self.pool.stalls if self.pool else 0,
                "producer_notices": len(self.pool.notices) if self.pool else 0, "generated_per_s": self.producer_rate()}

    def record(self, step: int, epoch: int, stats: dict[str, float], data_wait_s: float, write: bool,
               **values: float) -> None:
        """Account one finished step; ``data_wait_s``: how long it waited for its input (the pipeline was
        behind); ``write`` also appends a step row."""
        e, run = self._epoch, self._run
        e["data_wait_s"] += data_wait_s
        run.update(steps=run["steps"] + 1, step=step, wait_s=run["wait_s"] + stats["wait_s"],
                   data_wait_s=run["data_wait_s"] + data_wait_s, step_s=run["step_s"] + values.get("step_s", 0.0))
        synthetic = sum(stats[k] for k in SYNTHETIC_ORIGINS)
        for k in ORIGINS:
            self.totals[k] += stats[k]
            e[k] += stats[k]
        if synthetic:
            e["age_sum"] += stats["mean_age"] * synthetic
            e["reuse_sum"] += stats["mean_reuse"] * synthetic
        e["wait_s"] += stats["wait_s"]
        e["steps"] += 1
        if write and self.file:
            row = {"step": step, "epoch": epoch, **values, **stats, "data_wait_s": data_wait_s,
                   "data_wait_share": data_wait_s / values["step_s"] if values.get("step_s") else 0.0,
                   **{f"total_{k}": v for k, v in self.totals.items()},
                   **self._ring_state()}
            self._write(row)

    def end_epoch(self, epoch: int, **values: float) -> None:
        """Write the epoch row (with ``values``, e.g. the kNN accuracy) and its log line."""
        e = self._epoch
        if not e["steps"]:
            return
        synthetic = sum(e[k] for k in SYNTHETIC_ORIGINS)
        row = {"epoch_end": epoch, **values, **{k: e[k] for k in ORIGINS},
               "mean_age": e["age_sum"] / synthetic if synthetic else math.nan,
               "mean_reuse": e["reuse_sum"] / synthetic if synthetic else math.nan,
               "wait_s": e["wait_s"], "data_wait_s": e["data_wait_s"], "epoch_s": time.monotonic() - e["started"],
               **self._ring_state()}
        row["data_wait_share"] = row["data_wait_s"] / max(row["epoch_s"], 1e-9)
        if self.file:
            self._write(row, "epoch/")
        log.info("epoch %d: %d fresh, %d cached, %d from disk, %d fallback; mean age %.2f epochs, mean reuse "
                 "%.2f; waited %.1fs of %.1fs", epoch, e["fresh"], e["cached"], e["disk"], e["fallback"], row["mean_age"],
                 row["mean_reuse"], e["wait_s"], row["epoch_s"])
        for name, label in (("knn", "kNN"), ("linear", "linear probe")):
            if f"{name}_top1" in values:
                log.info("epoch %d: %s top-1 %.2f%% on held-out real images", epoch, label, values[f"{name}_top1"])
        self._epoch = self._empty_epoch()

    def state(self) -> dict:
        """The running totals and the current epoch's sums, which a run resumed mid-epoch continues."""
        return {"totals": self.totals, "epoch": {k: v for k, v in self._epoch.items() if k != "started"}}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state` of a checkpoint (the epoch's time counts from now)."""
        self.totals.update(state["totals"])
        self._epoch.update(state["epoch"])

    def postfix(self, loss: float) -> dict[str, str | int]:
        out: dict[str, str | int] = {"loss": f"{loss:.3f}", **self.totals}
        if self.port is not None:
            out["gen"] = f"{self.producer_rate():.0f}/s"
            out["wait"] = f"{self._epoch['wait_s']:.0f}s"
        return out

    def summary(self, global_batch: int) -> dict:
        """The run's totals since this object was made: images/s of the trainers (all ranks) and of this
        node's producers (None without), how second views were obtained, and the time spent waiting."""
        run, seconds = self._run, max(1e-9, time.monotonic() - self._started)
        return {"steps": run["steps"], "train_s": seconds, "trainer_images_per_s": run["steps"] * global_batch / seconds,
                "producer_images_per_s": self.producer_rate() if self.port else None,
                "generated": self.port.generated - self._generated0 if self.port else 0, "views": dict(self.totals),
                "data_wait_s": run["data_wait_s"], "data_wait_share": run["data_wait_s"] / max(run["step_s"], 1e-9),
                "view_wait_s": run["wait_s"], "notices": list(self.pool.notices) if self.pool else []}

    def _write(self, row: dict, prefix: str = "") -> None:
        self.file.write(json_text(row) + "\n")
        self.file.flush()
        if self.tracker is not None:
            self.tracker(scalars(row, prefix), self._run["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
