"""What a run does before its first step: its config (continued with ``--resume``), its run directory
and its logs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from onlinemix.core.config import Config, check_resume_overrides, load_config
from onlinemix.training.checkpoint import resume_point, scan
from onlinemix.training.rundir import CONFIG_FILE


def resolve_config(args, overrides: dict[str, str]) -> tuple[Config, tuple[Path, Path | None] | None]:
    """The run's config and, with ``--resume``, the run directory and checkpoint to continue from
    (``checkpoint.resume_point``: the checkpoint is None for the run's newest complete one)."""
    cfg = load_config(args.config, overrides)
    if args.resume is None:
        return cfg, None
    run_dir, checkpoint = resume_point(args.resume, Path(cfg.output_dir), cfg.run_name)
    resumed = load_config(run_dir / CONFIG_FILE, overrides)
    check_resume_overrides(load_config(run_dir / CONFIG_FILE), resumed)
    return resumed, (run_dir, checkpoint)


def set_aside_metrics(run_dir: Path) -> str:
    """Rename an earlier attempt's metrics.jsonl, whose steps a restart from step 0 trains again (kept, not
    mixed with the new rows); returns what was done, for the log."""
    old = run_dir / "metrics.jsonl"
    if not old.exists():
        return ""
    aside = run_dir / f"metrics-before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    old.rename(aside)
    return f" (the earlier attempt's metrics kept as {aside.name})"


def make_run_dir(cfg: Config, accelerator: Accelerator, resume: Path | None) -> Path:
    """Rank 0 names the run directory; every rank gets the same path, and each node's local main process
    creates it, so a node without a filesystem shared with the main process has one for what it writes
    (its producers' files). A directory is taken once a run has started training there (its config.yaml
    is written then, :func:`run`): a run that failed at start-up leaves only logs, and the corrected run
    may use the same name."""
    if resume is not None:
        return resume
    name = [cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.train.method}-{cfg.train.pairing}"]
    name = broadcast_object_list(name) if accelerator.num_processes > 1 else name
    run_dir = Path(cfg.output_dir) / name[0]
    if accelerator.is_main_process:
        if (run_dir / "config.yaml").exists():
            resumable = "" if scan(run_dir)[0] else \
                " (it has no complete checkpoint: --resume trains it from step 0 with its saved config)"
            raise FileExistsError(f"run directory {run_dir} already holds a run that started training; pick another "
                                  f"run_name, or --resume it{resumable}")
    if accelerator.is_local_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return run_dir


def setup_logging(accelerator: Accelerator, run_dir: Path) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s rank{accelerator.process_index} %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if accelerator.is_main_process:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
