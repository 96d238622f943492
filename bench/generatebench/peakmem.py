"""Peak memory of one call: ``torch.cuda.max_memory_allocated`` on CUDA (weights included); on the CPU the
peak RSS delta of the call, read from /proc/self/status (VmHWM after the call, reset through
/proc/self/clear_refs before it, minus VmRSS before it; free heap pages are handed back with glibc's
malloc_trim first, so that the call's allocations show)."""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path

import torch


def _proc_status_kib(*keys: str) -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)\s+kB", text, re.M).group(1)) for k in keys}


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Give free heap pages back to the OS (glibc), so that a call's allocations show up as new RSS."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory of the code inside ``with``: CUDA max_memory_allocated, or the CPU's peak RSS delta (/proc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self.over_start: int | None = None
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            self.trimmed = _malloc_trim()
            self.reset = _reset_peak_rss()
            self.start = _proc_status_kib("VmRSS", "VmHWM")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            self.over_start = self.bytes - self.start
            self.kind = "cuda max_memory_allocated (weights included)"
        else:
            hwm = _proc_status_kib("VmHWM")["VmHWM"]
            if self.reset:
                self.bytes = max(0, hwm - self.start["VmRSS"]) * 1024
                self.kind = ("CPU peak RSS delta of one call (/proc/self/status: VmHWM after the call minus VmRSS "
                             "before it; VmHWM reset via /proc/self/clear_refs"
                             + (", free heap returned first with malloc_trim)" if self.trimmed else
                                "; malloc_trim unavailable: pages the allocator kept are not counted)"))
            else:  # VmHWM could not be reset: only growth beyond the process's earlier high-water mark shows
                self.bytes = max(0, hwm - self.start["VmHWM"]) * 1024
                self.kind = "CPU VmHWM growth (/proc; clear_refs unavailable: a lower bound)"
            self.over_start = self.bytes
