"""The files of a run directory that other commands read back, and how to find them.

    <run>/config.yaml            the resolved config (CONFIG_FILE)
    <run>/checkpoints/step-N/    training state to resume from (onlinemix/training/checkpoint.py)
    <run>/backbone.safetensors   the final backbone (BACKBONE_FILE, load_backbone)
    <run>/.writer.lock           held by the run writing the directory (WRITER_LOCK, hold_run_dir)

Training writes these names; ``--resume``, the eval command and the statistics command read them
back, so they are declared once, here. A :class:`Checkpoint` is a backbone to evaluate: a run
directory or a ``.safetensors`` file next to its ``config.yaml``.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from onlinemix.core.config import Config, load_config
from onlinemix.core.errors import UserError
from onlinemix.methods.backbones import build_backbone

BACKBONE_FILE = "backbone.safetensors"
CONFIG_FILE = "config.yaml"
WRITER_LOCK = ".writer.lock"


class CheckpointError(UserError, ValueError):
    """A file of a run cannot be read back: cut short (a crash while saving) or corrupt."""


class RunDirInUse(FileExistsError):
    """Another live process writes this run directory."""


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """This process alone writes ``run_dir`` while in the block: two runs (or two ``--resume``) of one
    directory would write every metrics row twice and race on checkpoints. An exclusive ``flock``, which
    the kernel drops when its holder dies, so a killed run never blocks the next one."""
    fd = os.open(run_dir / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise RunDirInUse(f"run directory {run_dir} is being written by {holder}; wait for that run to end "
                              "(or stop it), or give this one another run_name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"the run of pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


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
