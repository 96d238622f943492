"""The files of a run directory that other commands read back, and how to find them.

    <run>/config.yaml            the resolved config (CONFIG_FILE)
    <run>/checkpoints/step-N/    accelerate training state (CHECKPOINT_DIR, latest_checkpoint)
    <run>/backbone.safetensors   the final backbone (BACKBONE_FILE, load_backbone)

Training writes these names; ``--resume``, the eval command and the statistics command read them
back, so they are declared once, here. A :class:`Checkpoint` is a backbone to evaluate: a run
directory or a ``.safetensors`` file next to its ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from .config import Config, load_config
from .models import build_backbone

BACKBONE_FILE = "backbone.safetensors"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The training state with the highest step under ``run_dir``, or None when there is none."""
    checkpoints = sorted((run_dir / CHECKPOINT_DIR).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


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
    backbone = build_backbone(cfg.train)
    try:
        backbone.load_state_dict(load_file(path))
    except RuntimeError as e:
        raise ValueError(f"{path} does not hold a train.backbone={cfg.train.backbone} backbone of this run's "
                         f"config: {str(e).splitlines()[0]}") from e
    return backbone
