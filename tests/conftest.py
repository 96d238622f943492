"""Shared fixtures: a check that no test leaves a ring segment behind, and a training runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onlinemix.core.config import GeneratorConfig
from onlinemix.exchange.ring import NAME_PREFIX, SHM_DIR

REPO = Path(__file__).resolve().parent.parent


def ring_segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{NAME_PREFIX}*")}


def _owned_by_another_live_process(segment: str) -> bool:
    """A segment whose creator (its name carries the pid) is alive and outside this test process's tree:
    a training run beside the tests, not theirs. A dead creator's segment is a leak whoever it was."""
    pid = int(segment[len(NAME_PREFIX):].split("-")[0])
    while pid > 1:
        if pid == os.getpid():
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent pid, after the (command) field
    return True


@pytest.fixture
def no_leaked_segments():
    """Fails the test if it leaves any onlinemix shared-memory segment in /dev/shm."""
    before = ring_segments()
    yield
    leaked = {s for s in ring_segments() - before if not _owned_by_another_live_process(s)}
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run like a CPU producer (generator.cpu_threads=1): the tiny model gains nothing from more
    threads, and oversubscribed OpenMP threads make it orders of magnitude slower on a busy host."""
    before = torch.get_num_threads()
    torch.set_num_threads(GeneratorConfig().cpu_threads)
    yield
    torch.set_num_threads(before)


def train_command(*args: str, launcher: str = "python") -> list[str]:
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                str(REPO / "onlinemix" / "train.py"), *args]
    return [sys.executable, "-m", "onlinemix.train", *args]


def run_training(*args: str, launcher: str = "python", timeout: float = 300,
                 cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(train_command(*args, launcher=launcher), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def assert_same_variation(actual, expected, *, max_share: float = 1e-3) -> None:
    """The same uint8 variation up to float rounding. Batched CPU kernels sum in an order that depends on
    the batch's size, so a generator's float output differs by ~1e-6 between batch compositions and a
    handful of pixels can round to the neighbouring level; anything more is a different image."""
    diff = (torch.as_tensor(actual).to(torch.int16) - torch.as_tensor(expected).to(torch.int16)).abs()
    assert diff.shape == torch.as_tensor(expected).shape
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= max_share, \
        f"{int((diff > 0).sum())} of {diff.numel()} values differ, by up to {int(diff.max())}"
