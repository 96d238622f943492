"""What the machine is and how busy it was: CPU and device names, versions, the filesystem under a path,
and ``LoadWatch``, which every benchmark runs around its measurements to record how many cores other
processes used meanwhile (they skew every rate) in the JSON "meta".

torch, diffusers and transformers are imported inside the functions that need them, so that bench/ring.py's
worker processes can import this module without importing torch.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SKEW_CORES = 0.2  # other processes using more cores than this while measuring: flagged as skewed


# ----------------------------------------------------------------------------- names and versions

def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else platform.processor() or platform.machine()."""
    name = platform.processor()
    try:  # platform.processor() is often empty on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name or platform.machine()


def cpu_meta() -> dict[str, Any]:
    """The "cpu" and "cpu_count" entries of a JSON "meta"."""
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count()}


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's name with its logical core count."""
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical cores)"


def torch_meta(device: torch.device, threads_default: bool) -> dict[str, Any]:
    """Device, thread and version entries of the JSON "meta" of the torch/diffusers benchmarks."""
    import diffusers
    import numpy as np
    import torch
    import transformers
    return {
        "device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "threads_default": threads_default,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
    }


def filesystem_type(path: Path) -> str:
    """The filesystem type under ``path`` as ``stat -f`` names it (ext2/ext3, tmpfs, ...), or "?"."""
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def mount_of(path: Path) -> str:
    """"<type> on <device>" of the mount holding ``path`` (the longest matching mount point in /proc/mounts)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, dev, fstype)
    except OSError:
        pass
    return f"{best[2]} on {best[1]}"


# ----------------------------------------------------------------------------- background load

def busy_cpu_s() -> float | None:
    """CPU seconds all processes on the machine have spent so far (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in (fields + ["0"] * 8)[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children so far (user + system)."""
    return sum(os.times()[:4])


CpuSnapshot = tuple[float | None, float, float]  # (busy_cpu_s(), own_cpu_s(), time.perf_counter())


def cpu_snapshot() -> CpuSnapshot:
    """Machine CPU seconds, own CPU seconds and wall clock now; pass it to ``other_cores_since`` later."""
    return busy_cpu_s(), own_cpu_s(), time.perf_counter()


def other_cores_since(before: CpuSnapshot) -> float | None:
    """Cores other processes used on average since ``before`` (None where /proc/stat is unreadable)."""
    busy_before, own_before, wall_before = before
    busy_after, own_after, wall_after = cpu_snapshot()
    return (None if busy_before is None or busy_after is None else
            max(0.0, (busy_after - busy_before) - (own_after - own_before)) / (wall_after - wall_before))


class LoadWatch:
    """The load on the machine from its creation (before measuring) to ``stop`` (after): ``meta`` gives the
    load, date and command entries of the JSON "meta", stopping the watch first if it still runs."""

    def __init__(self) -> None:
        self.loadavg_before = os.getloadavg()[0]
        self.start = cpu_snapshot()
        self.other_cores: float | None = None
        self.stopped = False

    def stop(self) -> None:
        """Read the cores other processes used since the start: the measurements are over."""
        self.other_cores, self.stopped = other_cores_since(self.start), True

    def meta(self, quick: bool, script: str, argv: list[str] | None) -> dict[str, Any]:
        """Load (the 1-min load average after is read now), date and command of the run."""
        if not self.stopped:
            self.stop()
        return {
            "loadavg_1min_before": self.loadavg_before, "loadavg_1min_after": os.getloadavg()[0],
            "other_processes_cores": self.other_cores,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick,
            "command": " ".join([f"python {script}", *(sys.argv[1:] if argv is None else argv)]),
        }
