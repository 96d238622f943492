"""Helpers shared by the benchmark scripts in bench/: the command line every benchmark starts from
(``BenchParser``: --device/--threads, --out, --quick and flag defaults that depend on --quick),
integer-list flags, torch device and thread set-up, machine naming, background-load measurement,
run metadata for the JSON, the report's "load" line, targets in the one shape every benchmark's JSON
uses (``target``, read by bench/run.py), the matplotlib import guard and the writing of the PNG and
JSON results.

Imported as ``from common import ...`` (the scripts run as ``python bench/<name>.py``, so bench/ is
``sys.path[0]``). torch, diffusers and transformers are imported inside the functions that need them,
so that bench/ring.py can import this module without importing torch at start-up.
"""

from __future__ import annotations

import argparse
import operator
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onlinemix.core.files import write_json

if TYPE_CHECKING:
    import torch

SKEW_CORES = 0.2  # other processes using more cores than this while measuring: flagged as skewed
RESULTS_DIR = Path(__file__).resolve().parent / "results"

Defaults = dict[str, tuple[Any, Any]]  # flag dest -> (value in a default run, value in a --quick run)


# ----------------------------------------------------------------------------- command line

class BenchParser(argparse.ArgumentParser):
    """The command line of one benchmark script, which adds only its own flags.

    ``add_torch_flags`` adds --device and --threads where the script wants them; ``parse`` adds the
    flags every benchmark ends with (--out, --quick), parses, and gives each flag of ``defaults``
    that was left out its default-run or --quick value (``default_note`` says which in a help text)."""

    def __init__(self, script: str, description: str, epilog: str, defaults: Defaults, quick_help: str) -> None:
        super().__init__(prog=script, description=description, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.defaults = defaults
        self.quick_help = quick_help
        self.per_device = False  # results default to one file per device type

    def default_note(self, key: str) -> str:
        """'(default X / quick Y)' for the help of a flag of ``defaults``."""
        default, quick = self.defaults[key]
        return f"(default {default} / quick {quick})"

    def add_torch_flags(self, threads_note: str) -> None:
        """--device and --threads, as ``setup_torch`` reads them; ``threads_note`` says what else the threads run."""
        self.per_device = True
        self.add_argument("--device", default=None,
                          help="torch device to measure on, e.g. cpu, cuda, cuda:1 (default: cuda when "
                               "torch.cuda.is_available(), else cpu)")
        self.add_argument("--threads", type=int, default=None,
                          help="torch intra-op threads (torch.set_num_threads). Default 1 on CPU, so that numbers "
                               "are per core and comparable between machines; on CUDA the torch default is kept "
                               f"unless given. {threads_note}")

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        """Add --out and --quick, parse ``argv``, fill in the flags left out and check --threads."""
        default_out = results_path(None, self.prog, "<device type>" if self.per_device else None)
        self.add_argument("--out", type=Path, default=None,
                          help=f"JSON results path; the PNG goes next to it with the same stem "
                               f"(default {default_out.relative_to(RESULTS_DIR.parent.parent)})")
        self.add_argument("--quick", action="store_true", help=self.quick_help)
        args = self.parse_args(argv)
        for key, (default, quick) in self.defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, quick if args.quick else default)
        if self.per_device:
            self.require_at_least(args, 1, "threads")
        return args

    def require_at_least(self, args: argparse.Namespace, minimum: int, *keys: str) -> None:
        """A usage error for the first flag of ``keys`` given a value below ``minimum`` (None: not given, passes)."""
        for key in keys:
            value = getattr(args, key)
            if value is not None and value < minimum:
                self.error(f"--{key.replace('_', '-')} must be >= {minimum}")


def results_path(out: Path | None, script: str, device_type: str | None = None) -> Path:
    """Where a benchmark writes its JSON: ``out`` (--out) when given, else bench/results/<script's stem>.json,
    or <stem>-<device type>.json for a benchmark of one torch device."""
    stem = Path(script).stem
    return out or RESULTS_DIR / (f"{stem}-{device_type}.json" if device_type else f"{stem}.json")


def int_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """The comma-separated positive integers of ``flag``, in the order given, repeats kept; else ``p.error``."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag} expects comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        p.error(f"{flag} expects positive integers, got {text!r}")
    return values


def setup_torch(device_flag: str | None, threads: int | None) -> torch.device:
    """The device of --device (default cuda when available, else cpu; exits when CUDA is asked for but absent),
    with torch's intra-op threads set to --threads, else to 1 on the CPU (rates per core), else left as they are."""
    import torch
    device = torch.device(device_flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {device}: CUDA is not available here")
    if threads is not None:
        torch.set_num_threads(threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)
    return device


# ----------------------------------------------------------------------------- machine info

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


def run_meta(load_before: float, other_cores: float | None, quick: bool, script: str,
             argv: list[str] | None) -> dict[str, Any]:
    """Load, date and command entries of the JSON "meta" (the 1-min load average after is read now)."""
    return {
        "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
        "other_processes_cores": other_cores,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick,
        "command": " ".join([f"python {script}", *(sys.argv[1:] if argv is None else argv)]),
    }


# ----------------------------------------------------------------------------- targets

NOT_MEASURED = "not measured here"
OPS = {">=": operator.ge, "<=": operator.le}


def target(name: str, value: float | None, goal: float, op: str = ">=", detail: str = "",
           measured: bool = True) -> dict[str, Any]:
    """One target as every benchmark's JSON lists it under "targets" (bench/run.py reads them all alike).

    ``status`` is PASS or MISS by ``value op goal``, or "not measured here" when ``value`` is None or the
    run could not judge it (``measured=False``: a GPU target on a CPU, a size this run did not measure;
    ``value`` then keeps what this run reached, for information)."""
    if op not in OPS:
        raise ValueError(f"target op must be one of {sorted(OPS)}, got {op!r}")
    status = (NOT_MEASURED if value is None or not measured else
              "PASS" if OPS[op](value, goal) else "MISS")
    return {"name": name, "value": value, "goal": goal, "op": op, "status": status, "detail": detail}


def target_line(t: dict[str, Any]) -> str:
    """A report line for one ``target``: status, name, value against the goal, detail."""
    value = "" if t["value"] is None else f": {t['value']:.3g} (goal {t['op']} {t['goal']:g})"
    return f"  {t['status']:<17} {t['name']}{value}" + (f"; {t['detail']}" if t["detail"] else "")


# ----------------------------------------------------------------------------- output

def load_line(m: dict[str, Any]) -> str:
    """The report's "load" line from the JSON meta, with a warning when the run was skewed."""
    return ("load        " + ("other processes used n/a" if m["other_processes_cores"] is None else
                              f"other processes used {m['other_processes_cores']:.2f} cores on average while measuring")
            + f" (1-min load average {m['loadavg_1min_before']:.2f} before, {m['loadavg_1min_after']:.2f} after)"
            + (f"\n            WARNING: other processes competed for the {m['cpu_count']} cores; the numbers are skewed"
               if (m["other_processes_cores"] or 0) > SKEW_CORES else ""))


def import_pyplot(script: str) -> Any:
    """matplotlib.pyplot on the Agg backend; exits with a hint naming ``script`` when matplotlib is missing
    (``save_results`` checks first, and skips the plot with a warning instead)."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"{script}: the plot needs matplotlib (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def has_matplotlib() -> bool:
    """Whether matplotlib imports: it comes with the test and bench extras only."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as a PNG at 110 dpi and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_results(res: dict[str, Any], out: Path, plot: Callable[[dict[str, Any], Path], None],
                 report: Callable[[dict[str, Any]], str], t0: float, started: float | None = None, *,
                 gap: bool = False, after_imports: bool = False) -> None:
    """Add the run's wall time since ``t0`` (and, when ``started`` is given, the time since then as
    "measure_s") to the meta of ``res``, write it as JSON to ``out``, then plot it to the PNG next to
    ``out`` (named in ``res["plot"]``; None, with a warning, without matplotlib), then print
    ``report(res)`` and where the files went (after a blank line with ``gap``, with the time after imports
    with ``after_imports``). The JSON comes first so that a plot that fails loses no measurement."""
    png = out.with_suffix(".png")
    res["plot"] = png.name if has_matplotlib() else None  # next to the JSON
    res["meta"]["wall_s"] = time.perf_counter() - t0
    if started is not None:
        res["meta"]["measure_s"] = time.perf_counter() - started
    write_json(out, res)
    if res["plot"]:
        plot(res, png)
    else:
        print(f"{res['meta'].get('command', 'bench')}: WARNING: matplotlib is not installed: no plot "
              f"(pip install matplotlib)", file=sys.stderr)
    print(report(res))
    times = f"{res['meta']['wall_s']:.1f}s in all" + (f", {res['meta']['measure_s']:.1f}s after imports"
                                                      if after_imports else "")
    written = f"{out} and {png}" if res["plot"] else f"{out}"
    print(("\n" if gap else "") + f"wrote {written}; {times}")


class Timer:
    """Wall-clock span that waits for queued CUDA work at both ends; ``with Timer(device) as t`` then ``t.seconds``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Timer":
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start
