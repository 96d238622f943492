"""Experiment trackers (accelerate's TensorBoard and Weights & Biases) and the run summary.

The main process logs every ``metrics.jsonl`` row's numbers to the tracker chosen by
``report_to`` (``auto``: TensorBoard when it is installed; the run works without it), and
ends the run with a summary: trainer and producer images/s, how the second views were
obtained, the time spent waiting, and the final checkpoint, printed and written to
``summary.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, is_wandb_available

from onlinemix.core.config import Config, ConfigError, to_dict

SUMMARY_FILE = "summary.json"
WANDB_PROJECT = "onlinemix"


def chosen_tracker(report_to: str) -> str | None:
    """The tracker ``report_to`` names, None for none; a tracker that is not installed is a config error."""
    if report_to == "none" or (report_to == "auto" and not is_tensorboard_available()):
        return None
    tracker = "tensorboard" if report_to == "auto" else report_to
    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[tracker]():
        raise ConfigError(f"report_to={tracker} needs the {tracker} package: pip install {tracker}, or use "
                          "--report-to none (metrics.jsonl is written either way)")
    return tracker


def start_tracking(accelerator: Accelerator, cfg: Config, run_dir: Path) -> None:
    """Start the tracker on the main process: TensorBoard event files in ``run_dir`` (its config is the
    run's config.yaml), or a wandb run named after it in project ``onlinemix``, with the config. The
    Accelerator was made with ``log_with`` = :func:`chosen_tracker`."""
    if not accelerator.log_with:
        return
    accelerator.project_configuration.logging_dir = str(run_dir.parent)  # TensorBoard writes to <dir>/<run name>
    wandb = {"wandb": {"name": run_dir.name, "dir": str(run_dir), "config": to_dict(cfg)}}
    project = run_dir.name if "tensorboard" in [str(t) for t in accelerator.log_with] else WANDB_PROJECT
    accelerator.init_trackers(project, init_kwargs=wandb)


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics row's finite numbers, for a tracker (the step and epoch counters are its axes, not values)."""
    return {f"{prefix}{k}": float(v) for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and k not in ("step", "epoch", "epoch_end")}


def format_summary(summary: dict[str, Any]) -> str:
    """The run summary as the lines printed at the end of training."""
    views = summary["views"]
    producers = ("none" if summary["producer_images_per_s"] is None else
                 f"{summary['producer_images_per_s']:,.1f} images/s on this node ({summary['generated']} generated)")
    return "\n".join([
        "run summary",
        f"  trainer      {summary['trainer_images_per_s']:,.1f} images/s ({summary['steps']} steps in "
        f"{summary['train_s']:.1f}s)",
        f"  producers    {producers}",
        f"  second views {views['fresh']} fresh, {views['cached']} cached, {views['disk']} from disk, "
        f"{views['fallback']} fallback",
        f"  waiting      {summary['data_wait_s']:.1f}s for input ({100 * summary['data_wait_share']:.0f}% of the "
        f"steps' time); the input pipeline waited {summary['view_wait_s']:.1f}s for missing views",
        f"  checkpoint   {summary['checkpoint']}",
        *(f"  notice       {notice}" for notice in summary.get("notices", [])),
    ])
