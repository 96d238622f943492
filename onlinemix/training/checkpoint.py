"""Checkpoints a run resumes from: written atomically, chosen only when complete, pruned.

    <run>/checkpoints/step-N/        accelerate's state (model, optimizer, scaler, RNG states, registered
                                     objects such as DINO's teacher), trainer_state.json (the step),
                                     rank-R.json (each trainer rank's counters), COMPLETE (written last)
    <run>/checkpoints/.step-N.tmp/   a checkpoint being written

Every rank writes into the temporary directory; once all have, the main process fsyncs its files,
writes the ``COMPLETE`` marker and renames the directory into place. A save killed half-way leaves
a temporary directory (or, copied by other means, a ``step-N`` without its marker): neither is
ever chosen, and ``--resume`` logs that it skipped them. Newer means saved later (the marker's
time), so a run resumed from an older checkpoint continues from its own latest one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open

from onlinemix.core.files import fsync_path, json_text, write_atomically, write_json
from onlinemix.training.rundir import CONFIG_FILE, CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
COMPLETE_FILE = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.json"
TMP_SUFFIX = ".tmp"


def rank_state_file(rank: int) -> str:
    """The file of one trainer rank's counters (metrics totals, cache uses) in a checkpoint."""
    return f"rank-{rank}.json"


@dataclass(frozen=True)
class Saved:
    """A complete checkpoint: its directory, step and when it was saved (``time.time()``)."""
    path: Path
    step: int
    saved_at: float


def scan(run_dir: Path) -> tuple[list[Saved], list[Path]]:
    """The complete checkpoints under ``run_dir`` (oldest first) and the incomplete ones (cut short)."""
    complete, incomplete = [], []
    root = run_dir / CHECKPOINT_DIR
    for path in sorted(root.glob("step-*")):
        try:
            marker = json.loads((path / COMPLETE_FILE).read_text())
            complete.append(Saved(path, int(marker["step"]), float(marker["saved_at"])))
        except (OSError, ValueError, KeyError, TypeError):
            incomplete.append(path)
    incomplete += sorted(root.glob(f".step-*{TMP_SUFFIX}"))  # renamed into place only once complete
    return sorted(complete, key=lambda s: (s.saved_at, s.step)), incomplete


def newest_checkpoint(run_dir: Path) -> Saved | None:
    """The newest complete checkpoint of a run, or None; the incomplete ones it skips are logged."""
    complete, incomplete = scan(run_dir)
    for path in incomplete:
        log.warning("skipping incomplete checkpoint %s (no %s marker: its saving was cut short)", path, COMPLETE_FILE)
    return complete[-1] if complete else None


def resume_point(arg: str, output_dir: Path, run_name: str) -> tuple[Path, Path | None]:
    """(run directory, checkpoint) for ``--resume auto | RUN_DIR | CHECKPOINT_DIR``. ``auto`` is the run
    directory ``output_dir/run_name`` (any run under ``output_dir`` without a run name) whose newest
    complete checkpoint is the newest; the checkpoint is None where the run's newest complete one is
    meant (:func:`newest_checkpoint`, called once logging goes to the run's log)."""
    if arg == "auto":
        runs = [output_dir / run_name] if run_name else sorted(p for p in output_dir.glob("*") if p.is_dir())
        newest = [(saved[-1].saved_at, run) for run in runs if (saved := scan(run)[0])]
        if not newest:
            if run_name and (runs[0] / CONFIG_FILE).is_file():
                return runs[0], None  # it started training but saved nothing complete: from step 0
            where = runs[0] if run_name else f"any run directory in {output_dir}"
            raise CheckpointError(f"--resume auto: no complete checkpoint in {where}; start the run without --resume")
        return max(newest)[1], None
    path = Path(arg)
    if path.parent.name == CHECKPOINT_DIR and path.name.startswith("step-"):
        if not (path / COMPLETE_FILE).is_file():
            raise CheckpointError(f"--resume {path}: not a complete checkpoint (no {COMPLETE_FILE} marker: its saving "
                                  f"was cut short, or it does not exist); resume from its run directory "
                                  f"{path.parent.parent} to take the newest complete one")
        return path.parent.parent, path
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"--resume {path}: no {CONFIG_FILE} there: not an onlinemix run directory, or a run "
                              "that stopped before training started (start it again without --resume)")
    return path, None


def unreadable(path: Path) -> str | None:
    """Why a file of a training state cannot be read back, or None. Cheap: safetensors headers (which
    cover the file's length), JSON, and the zip directory at the end of torch.save's archives."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt"):
                return None
        except SafetensorError as e:
            return str(e)
    if path.suffix == ".json" or path.name == COMPLETE_FILE:
        try:
            json.loads(path.read_text())
            return None
        except ValueError as e:
            return f"not valid JSON ({e})"
    return None if zipfile.is_zipfile(path) else "not a complete torch.save archive"


def check_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of checkpoint ``path`` that cannot be read
    back (a disk that corrupted it, a copy cut short), and what to do about it."""
    earlier = [s.path for s in scan(path.parent.parent)[0] if s.path != path]
    fix = (f"delete {path} to resume from the checkpoint before it ({earlier[-1].name})" if earlier
           else f"there is no earlier checkpoint: start the run again (a new run_name, or after deleting "
                f"{path.parent.parent})")
    if not (path / COMPLETE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE_FILE} marker: saving was cut short); {fix}")
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        problem = unreadable(file)
        if problem:
            raise CheckpointError(f"checkpoint file {file} cannot be read ({problem}): it was cut short or is "
                                  f"corrupt; {fix}")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing a checkpoint already there (a run resumed from an older
    checkpoint that reaches this step again)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(final.parent)


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (0 keeps all), and the temporary
    directories of saves that were cut short."""
    complete, incomplete = scan(run_dir)
    for path in [s.path for s in complete[:-keep]] if keep else []:
        shutil.rmtree(path)
    for path in incomplete:
        if path.name.endswith(TMP_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the complete checkpoint of ``step`` lies."""
    return run_dir / CHECKPOINT_DIR / f"step-{step}"


def write_failure(e: OSError | SafetensorError) -> str:
    """The OS's words for a failed write (safetensors wraps them in a Rust debug string)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    found = re.search(r'message: "([^"]+)"|I/O error: (.+?) \(os error \d+\)', str(e))
    return (found[1] or found[2]) if found else str(e).splitlines()[0]


def what_survives(run_dir: Path) -> str:
    complete = scan(run_dir)[0]
    return f"the checkpoint of step {complete[-1].step} is intact" if complete else "no earlier checkpoint exists"


def save_checkpoint(acc: Accelerator, run_dir: Path, step: int, rank_state: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically (every rank calls this; see the module docstring),
    prune to the newest ``keep``, and return its directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}{TMP_SUFFIX}")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save of this step that was killed
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
        write_json(tmp / rank_state_file(acc.process_index), rank_state)
    except (OSError, SafetensorError) as e:  # a full disk, or a file-size or quota limit
        shutil.rmtree(tmp, ignore_errors=True)  # what was written of it: the space goes back
        raise CheckpointError(f"cannot write checkpoint {final} ({write_failure(e)}); {what_survives(run_dir)}; "
                              f"free space for {run_dir}, then --resume it") from e
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json(tmp / TRAINER_STATE_FILE, {"step": step})
        for file in tmp.rglob("*"):
            fsync_path(file)
        write_atomically(tmp / COMPLETE_FILE,
                         lambda f: f.write(json_text({"step": step, "saved_at": time.time()}).encode()))
        _replace_dir(tmp, final)
        prune(run_dir, keep)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc: Accelerator, path: Path) -> tuple[int, dict]:
    """Restore accelerate's state from checkpoint ``path``; returns its step and this rank's counters
    (empty when the run had fewer ranks: they start at zero)."""
    check_checkpoint(path)  # a truncated file is named, not a bare SafetensorError
    state = json.loads((path / TRAINER_STATE_FILE).read_text())
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0):
        raise CheckpointError(f"checkpoint file {path / TRAINER_STATE_FILE} holds no step count "
                              f"({str(state)[:80]}); delete {path} to resume from the checkpoint before it")
    acc.load_state(str(path))
    rank_file = path / rank_state_file(acc.process_index)
    if not rank_file.is_file():
        log.warning("%s has no %s (it was saved by fewer ranks): this rank's counters start at zero", path,
                    rank_file.name)
        return state["step"], {}
    counters = json.loads(rank_file.read_text())
    if not isinstance(counters, dict):
        raise CheckpointError(f"checkpoint file {rank_file} holds no counters ({str(counters)[:80]}); delete "
                              f"{path} to resume from the checkpoint before it")
    return state["step"], counters


class CheckpointSchedule:
    """When the training loop saves and whether it stops, decided after each step the same way on every
    rank (one small all-reduce): every ``every`` steps, ``every_s`` seconds after the last save (the
    main process's clock), and at once when a rank was asked to stop (SIGTERM, Ctrl-C)."""

    def __init__(self, acc: Accelerator, every: int, every_s: float) -> None:
        self.acc = acc
        self.every = every
        self.every_s = every_s
        self.last_save = time.monotonic()

    def __call__(self, step: int, stop_requested: bool) -> tuple[bool, bool]:
        """(save, stop) after ``step`` steps."""
        overdue = bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s
        flags = torch.tensor([stop_requested, overdue and self.acc.is_main_process], device=self.acc.device)
        if self.acc.num_processes > 1:
            flags = self.acc.reduce(flags.int(), reduction="sum") > 0
        stop, overdue = (bool(f) for f in flags.tolist())
        return stop or overdue or bool(self.every and step % self.every == 0), stop

    def saved(self) -> None:
        self.last_save = time.monotonic()
