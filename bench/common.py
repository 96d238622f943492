"""The command line and the results every benchmark in bench/ shares: ``BenchParser`` (--device/--threads,
--out, --quick and flag defaults that depend on --quick), list flags, torch device and thread set-up,
targets in the one shape every benchmark's JSON lists them (``target``, read by bench/run.py), the files
of a run (its scratch directory, a child Python's environment, a training run's metrics) and the writing of
the JSON and PNG results.

Imported as ``from common import ...`` (the scripts run as ``python bench/<name>.py``, so bench/ is
``sys.path[0]``). torch is imported inside the functions that need it, so that bench/ring.py can import
this module without importing torch at start-up.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plots import has_matplotlib

from onlinemix.core.files import write_json

if TYPE_CHECKING:
    import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

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

    def require_fraction(self, args: argparse.Namespace, *keys: str) -> None:
        """A usage error for the first flag of ``keys`` outside (0, 1]."""
        for key in keys:
            if not 0 < getattr(args, key) <= 1:
                self.error(f"--{key.replace('_', '-')} must be in (0, 1]")


def results_path(out: Path | None, script: str, device_type: str | None = None) -> Path:
    """Where a benchmark writes its JSON: ``out`` (--out) when given, else bench/results/<script's stem>.json,
    or <stem>-<device type>.json for a benchmark of one torch device."""
    stem = Path(script).stem
    return out or RESULTS_DIR / (f"{stem}-{device_type}.json" if device_type else f"{stem}.json")


def output_path(out: Path | None, script: str, device_type: str | None = None) -> Path:
    """``results_path``, with its directory made."""
    path = results_path(out, script, device_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def int_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """The comma-separated positive integers of ``flag``, in the order given, repeats kept; else ``p.error``."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag} expects comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        p.error(f"{flag} expects positive integers, got {text!r}")
    return values


def choice_list(p: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """The comma-separated values of ``flag``, each one of ``allowed``, repeats dropped; else ``p.error``."""
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        p.error(f"{flag} expects comma-separated values among {', '.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(values))


def only_list(p: argparse.ArgumentParser, text: str | None, names: list[str], kind: str) -> list[str] | None:
    """The comma-separated names of --only, each one of ``names`` (else ``p.error`` names the unknown
    ``kind``s); None when --only was not given: everything runs."""
    if text is None:
        return None
    only = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := sorted(set(only) - set(names)):
        p.error(f"--only: unknown {kind}(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return only


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


# ----------------------------------------------------------------------------- files

@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new directory under ``parent`` (made if missing) for a run's temporary files, removed afterwards
    whatever happens, so that no run leaves images, stores or caches behind."""
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a training run's metrics.jsonl: one per logged step, one per epoch's end."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment, plus ``extra``, for a child Python that imports the package of this
    checkout first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


# ----------------------------------------------------------------------------- results

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
