"""The files of a run directory that other commands read back, and how to find them.

    <run>/config.yaml            the resolved config (CONFIG_FILE)
    <run>/checkpoints/step-N/    accelerate training state (CHECKPOINT_DIR, latest_checkpoint)
    <run>/backbone.safetensors   the final backbone (BACKBONE_FILE, load_backbone)

Training writes these names; ``--resume``, the eval command and the statistics command read them
back, so they are declared once, here. A :class:`Checkpoint` is a backbone to evaluate: a run
directory or a ``.safetensors`` file next to its ``config.yaml``.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .config import Config, load_config
from .models import build_backbone

BACKBONE_FILE = "backbone.safetensors"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"  # written last into a checkpoint: without it, saving was cut short


class CheckpointError(ValueError):
    """A file of a run cannot be read back: cut short (a crash while saving) or corrupt."""


def checkpoints(run_dir: Path) -> list[Path]:
    """The training states under ``run_dir``, by step."""
    return sorted((run_dir / CHECKPOINT_DIR).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The training state with the highest step under ``run_dir``, or None when there is none."""
    saved = checkpoints(run_dir)
    return saved[-1] if saved else None


def unreadable(path: Path) -> str | None:
    """Why a file of a training state cannot be read back, or None. Cheap: safetensors headers (which
    cover the file's length), JSON, and the zip directory at the end of torch.save's archives."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt"):
                return None
        except SafetensorError as e:
            return str(e)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
            return None
        except ValueError as e:
            return f"not valid JSON ({e})"
    return None if zipfile.is_zipfile(path) else "not a complete torch.save archive"


def check_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of training state ``path`` (a
    ``checkpoints/step-N`` directory) that cannot be read back, and what to do about it."""
    run_dir = path.parent.parent
    earlier = [p for p in checkpoints(run_dir) if p != path]
    fix = (f"delete {path} to resume from the checkpoint before it ({earlier[-1].name})" if earlier
           else f"there is no earlier checkpoint: start the run again (a new run_name, or after deleting {run_dir})")
    if not (path / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {TRAINER_STATE_FILE}: saving was cut short); {fix}")
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        problem = unreadable(file)
        if problem:
            raise CheckpointError(f"checkpoint file {file} cannot be read ({problem}): it was cut short or is "
                                  f"corrupt; {fix}")


@dataclass
class Checkpoint:
    """A backbone to evaluate: its name in result files, its run directory and weights, the run's config."""
    name: str
    run_dir: Path
    weights: Path
    cfg: Config


def resolve_checkpoint(path: Path) -> Checkpoint:
    """A run directory (config.yaml + backbone.safetensors) or a .safetensors backbone next to a config.yaml."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    run_dir, weights = (path, path / BACKBONE_FILE) if path.is_dir() else (path.parent, path)
    if weights.suffix != ".safetensors":
        raise ValueError(f"checkpoint {path}: expected a run directory or a .safetensors backbone file")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {path}: no {CONFIG_FILE} in {run_dir}; is it an onlinemix run directory?")
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path}: {weights} does not exist; is {run_dir} a finished onlinemix run?")
    name = run_dir.resolve().name if weights.name == BACKBONE_FILE else f"{run_dir.resolve().name}-{weights.stem}"
    return Checkpoint(name, run_dir, weights, load_config(run_dir / CONFIG_FILE))


def load_backbone(run_dir: Path, cfg: Config, weights: Path | None = None) -> nn.Module:
    """The run's backbone architecture with ``weights`` (default: the run's final backbone) loaded into it."""
    path = weights or run_dir / BACKBONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a finished onlinemix run?")
    try:
        state = load_file(path)
    except SafetensorError as e:
        fix = (f"`python -m onlinemix.train --resume {run_dir}` writes it again from the run's last checkpoint"
               if path.name == BACKBONE_FILE else "copy or export it again")
        raise CheckpointError(f"{path} cannot be read ({e}): it was cut short or is corrupt; {fix}") from None
    backbone = build_backbone(cfg.train)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not hold a train.backbone={cfg.train.backbone} backbone of this run's "
                         f"config: {str(e).splitlines()[0]}") from e
    return backbone
