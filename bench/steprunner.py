"""Checks run one at a time, each a command in a process group of its own under a time limit, judged by what
it leaves behind (bench/gpu_check.py's steps).

At the limit a step's group gets SIGTERM, then SIGKILL after ``KILL_GRACE_S`` (a trainer stuck in a CUDA or
NCCL call outlives the first; the trainer's own first SIGTERM means "stop after this step"), and the next
step runs. Whatever a step leaves running in its group is killed when it ends, so that no step shares the
machine with the last one's leftovers. After every step OUT/gpu_check.json is rewritten with every row so far.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import REPO
from report import cell, last_line

from onlinemix.core.files import write_json

KILL_GRACE_S = 5.0
PASS, MISS, FAIL = "PASS", "MISS", "FAIL"
REPORT = "gpu_check.json"


@dataclass(frozen=True)
class Verdict:
    """What a step's results say: its status (PASS, MISS or FAIL), the figure shown, and why when not PASS."""

    status: str
    figure: str
    reason: str = ""


@dataclass(frozen=True)
class Step:
    """One check: a command run from the repository root, its time limit, and how its results are judged.

    ``results`` are the files or directories the judge reads; they are removed before the step runs, so that
    an earlier run's results never pass for this one's. ``stdout`` names the file in the output directory
    that gets the step's standard output (a command printing its JSON); otherwise it goes to the log.
    ``env`` sets variables for the step, a value of None removing one."""

    name: str
    command: tuple[str, ...]
    limit_s: float
    target: str
    judge: Callable[[Path], Verdict]
    results: tuple[Path, ...] = ()
    stdout: str | None = None
    env: dict[str, str | None] = field(default_factory=dict)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to every process of the group; a group already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def wait_or_kill(proc: subprocess.Popen, limit_s: float, grace_s: float) -> bool:
    """Wait for ``proc`` up to ``limit_s``; past it, SIGTERM its group and SIGKILL it after ``grace_s``.
    What the step left running in its group is killed either way; a process the kill cannot reach at once
    (in a driver call in uninterruptible sleep) is left after another ``grace_s``, with no exit status, so
    that the check goes on. True when it ran past its limit."""
    try:
        proc.wait(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    return timed_out


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def step_env(step: Step) -> dict[str, str]:
    """This process's environment with the step's changes: nothing downloaded, no progress bars."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    for key, value in step.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def judge(step: Step, out: Path, returncode: int, timed_out: bool, log: Path) -> Verdict:
    """The step's verdict: FAIL when it ran past its limit or exited non-zero (with the figure it left, if
    any), else what its judge reads in its results; a result that cannot be read is a FAIL too."""
    try:
        verdict = step.judge(out)
    except Exception as e:  # noqa: BLE001 - a missing or malformed result is the step's failure, not the check's
        verdict = Verdict(FAIL, "-", f"no readable result ({e.__class__.__name__}: {e})")
    if timed_out:
        return Verdict(FAIL, verdict.figure, f"killed at its limit of {step.limit_s:g}s")
    if returncode != 0:
        why = last_line(log.read_text(errors="replace") if log.is_file() else "") or verdict.reason or "no output"
        return Verdict(FAIL, verdict.figure, f"exit status {returncode}: {why}")
    return verdict


def run_step(step: Step, out: Path, grace_s: float = KILL_GRACE_S) -> dict[str, Any]:
    """Run one step in a process group of its own, under its limit, and return its row."""
    for path in step.results:
        remove(path)
    log = out / f"{step.name}.log"
    started = time.monotonic()
    with open(log, "wb") as log_file, open(out / step.stdout if step.stdout else os.devnull, "wb") as stdout_file:
        proc = subprocess.Popen(step.command, cwd=REPO, env=step_env(step), stdin=subprocess.DEVNULL,
                                stdout=stdout_file if step.stdout else log_file,
                                stderr=log_file if step.stdout else subprocess.STDOUT, start_new_session=True)
        timed_out = wait_or_kill(proc, step.limit_s, grace_s)
    seconds = time.monotonic() - started
    verdict = judge(step, out, proc.returncode, timed_out, log)
    return {"step": step.name, "status": verdict.status, "figure": verdict.figure, "target": step.target,
            "reason": verdict.reason, "seconds": round(seconds, 1), "limit_s": step.limit_s,
            "returncode": proc.returncode, "timed_out": timed_out, "log": log.name,
            "command": " ".join(step.command)}


def write_report(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], finished: bool) -> None:
    """OUT/gpu_check.json: the machine, every row so far, the failed steps, and whether every step ran."""
    write_json(out / REPORT, {"meta": meta, "finished": finished, "steps": rows,
                              "failed": [r["step"] for r in rows if r["status"] == FAIL]})


def run_steps(steps: Sequence[Step], out: Path, meta: dict[str, Any], grace_s: float = KILL_GRACE_S
              ) -> list[dict[str, Any]]:
    """Run ``steps`` in turn, each whatever the last one did, rewriting the report after each."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for step in steps:
        print(f"== {step.name} (limit {step.limit_s:g}s): {' '.join(step.command)}", file=sys.stderr, flush=True)
        rows.append(run_step(step, out, grace_s))
        row = rows[-1]
        print(f"   {row['status']} in {row['seconds']:.0f}s: {row['figure']}"
              + (f" ({row['reason']})" if row["reason"] else ""), file=sys.stderr, flush=True)
        write_report(out, meta, rows, finished=False)
    write_report(out, meta, rows, finished=True)
    return rows


def exit_status(rows: Sequence[dict[str, Any]]) -> int:
    """1 when any row is FAIL, else 0 (a MISS is a finding)."""
    return int(any(r["status"] == FAIL for r in rows))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as one Markdown table (step, status, figure, target, seconds), then why each non-PASS row is so."""
    lines = ["| step | status | figure | target | s |", "|---|---|---|---|---:|"]
    lines += [f"| {r['step']} | {r['status']} | {cell(r['figure'])} | {cell(r['target'])} | {r['seconds']:.0f} |"
              for r in rows]
    lines += [f"{r['step']}: {r['status']}: {r['reason']} (log: {r['log']})" for r in rows if r["reason"]]
    return "\n".join(lines)
