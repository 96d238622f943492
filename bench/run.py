"""Every benchmark in one command, and one table of every target.

    python -m bench --quick                     # each script's --quick settings: a few minutes on 2 CPU cores
    python -m bench                             # the default runs
    python -m bench --only ring,precompute      # a subset, in the table's order

Each script of ``BENCHES`` runs in its own process (``python bench/<name>.py [--quick] --out DIR/<name>.json``),
so one that fails is reported and the rest still run. Its JSON and PNG go to DIR, its output to
DIR/<name>.log. DIR defaults to bench/results/<YYYY-MM-DD>-<device>/, device being the CUDA device's
name or cpu-<N>core. Every script lists its targets in its JSON in one shape (``common.target``); the
summary (printed, and written as DIR/summary.md and DIR/summary.json) has a row per target: PASS,
MISS or not measured here, a row "no target" for a script without one, and FAILED for a script that
exited with an error (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

from common import BENCH_DIR, NOT_MEASURED, REPO, RESULTS_DIR, only_list
from report import cell, last_line
from tqdm.auto import tqdm

from onlinemix.core.files import write_json

FAILED = "FAILED"
NO_TARGET = "no target"


@dataclass(frozen=True)
class Bench:
    name: str
    about: str
    script: Path | None = None  # default bench/<name>.py

    @property
    def path(self) -> Path:
        return self.script or BENCH_DIR / f"{self.name}.py"


BENCHES = (
    Bench("generate", "the generator vs the plain diffusers call and the FLOP bound"),
    Bench("ring", "pairs through the shared-memory ring vs memcpy and a multiprocessing Queue"),
    Bench("cache", "the cache's raw and jpeg shards and PNG tars vs the trainer's rate"),
    Bench("data", "the image store vs memcpy and ImageFolder + DataLoader"),
    Bench("augment", "batched views vs torchvision per image"),
    Bench("throughput", "generation vs training, the MixDiff step cost, the ring, the node split"),
    Bench("precompute", "cache warm + offline training vs online producers"),
    Bench("tradeoff", "the online system's simulator vs real runs; generation wasted, trainer stalls"),
    Bench("planner", "the planner vs full simulations from 1:1 to 1:3000; throughput kept, waste, generation"),
    Bench("memory", "each recipe's per-rank GPU memory, estimated on the CPU, vs an 80 GB GPU"),
    Bench("speedups", "generation speed-ups and the distilled student vs the plain pipeline, with their quality"),
)


def device_label() -> str:
    """The CUDA device's name (as a file name), else cpu-<N>core."""
    import torch

    if torch.cuda.is_available():
        return re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name(0)).strip("-")
    return f"cpu-{os.cpu_count()}core"


def shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside (the scripts run there), so that commands, logs
    and JSON name no particular checkout."""
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def run_bench(bench: Bench, out_dir: Path, quick: bool) -> dict:
    """Run one script in its own process; what it reported, or why it failed."""
    out, log = out_dir / f"{bench.name}.json", out_dir / f"{bench.name}.log"
    out.unlink(missing_ok=True)  # a result of an earlier run must not pass for this one
    command = [sys.executable, str(shown(bench.path)), *(["--quick"] if quick else []), "--out", str(shown(out))]
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "TQDM_DISABLE": "1"})
    row = {"bench": bench.name, "about": bench.about, "command": " ".join(command[1:]), "log": log.name,
           "seconds": time.perf_counter() - started, "returncode": proc.returncode}
    if proc.returncode != 0 or not out.is_file():
        why = f"exit status {proc.returncode}" if proc.returncode else f"wrote no {out.name}"
        error = last_line(log.read_text(errors="replace")) or "no output"
        return {**row, "status": FAILED, "error": f"{why}: {error}"}
    res = json.loads(out.read_text())
    if not isinstance(res.get("targets"), list):
        return {**row, "status": FAILED, "error": f"{out.name} has no \"targets\" list: list them with common.target"}
    return {**row, "status": "ok", "json": out.name, "plot": res.get("plot"), "targets": res["targets"],
            "other_processes_cores": res.get("meta", {}).get("other_processes_cores")}


def summary_rows(results: list[dict]) -> list[dict]:
    """One row per target of every script; one row for a script with none, and for one that failed."""
    rows = []
    for r in results:
        if r["status"] == FAILED:
            rows.append({"bench": r["bench"], "status": FAILED, "target": r["error"], "value": None, "goal": None,
                         "op": None})
        elif not r["targets"]:
            rows.append({"bench": r["bench"], "status": NO_TARGET, "target": r["about"], "value": None, "goal": None,
                         "op": None})
        else:
            rows += [{"bench": r["bench"], "status": t["status"], "target": t["name"], "value": t["value"],
                      "goal": t["goal"], "op": t["op"]} for t in r["targets"]]
    return rows


def format_summary(summary: dict) -> str:
    """The summary as Markdown: where and how it ran, the target table, each script's time, load and files."""
    m = summary["meta"]
    lines = [f"# Benchmarks on {m['device']}", "",
             f"`{m['command']}`, {m['date']}, {m['cpu_count']} logical cores" + (", --quick" if m["quick"] else ""),
             "", "| bench | status | target | value | goal |", "|---|---|---|---:|---|"]
    for row in summary["rows"]:
        value = "" if row["value"] is None else f"{row['value']:#.3g}".rstrip(".")  # 1.00, 268
        goal = "" if row["goal"] is None else f"{row['op']} {row['goal']:g}"
        lines.append(f"| {row['bench']} | {row['status']} | {cell(row['target'])} | {value} | {goal} |")
    lines += ["", "| bench | seconds | other processes' cores | files |", "|---|---:|---:|---|"]
    for r in summary["benches"]:
        load = "" if r.get("other_processes_cores") is None else f"{r['other_processes_cores']:.2f}"
        files = ", ".join(f for f in (r.get("json"), r.get("plot"), r["log"]) if f)
        lines.append(f"| {r['bench']} | {r['seconds']:.0f} | {load} | {files} |")
    counts = {s: sum(row["status"] == s for row in summary["rows"]) for s in ("PASS", "MISS", FAILED)}
    lines += ["", f"{counts['PASS']} PASS, {counts['MISS']} MISS, "
                  f"{sum(row['status'] == NOT_MEASURED for row in summary['rows'])} {NOT_MEASURED}, "
                  f"{counts[FAILED]} failed"]
    return "\n".join(lines)


def run_benches(benches: tuple[Bench, ...], out_dir: Path, quick: bool, command: str, device: str) -> dict:
    """Run ``benches`` in turn into ``out_dir`` and write summary.md and summary.json there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tqdm(benches, desc="bench", unit="script", dynamic_ncols=True) as bar:
        for bench in bar:
            bar.set_description(bench.name)
            results.append(run_bench(bench, out_dir, quick))
    summary = {"meta": {"device": device, "cpu_count": os.cpu_count(), "quick": quick, "command": command,
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
               "benches": results, "rows": summary_rows(results)}
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(format_summary(summary) + "\n")
    return summary


def exit_status(summary: dict) -> int:
    """1 when a script failed, else 0 (a MISS is a result, not a failure)."""
    return int(any(r["status"] == FAILED for r in summary["benches"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [b.name for b in BENCHES]
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                epilog="benchmarks, in order: " + ", ".join(names) + ". docs/benchmarks.md explains "
                                       "how to read each one.")
    p.add_argument("--quick", action="store_true", help="each script's --quick settings (smaller, noisier)")
    p.add_argument("--only", default=None, help="comma-separated benchmarks to run (default: all)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the JSON, PNG, logs and summary go (default bench/results/<date>-<device>)")
    args = p.parse_args(argv)
    args.only = only_list(p, args.only, names, "benchmark")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benches = tuple(b for b in BENCHES if args.only is None or b.name in args.only)
    device = device_label()
    out_dir = args.out_dir or RESULTS_DIR / f"{date.today().isoformat()}-{device}"
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    summary = run_benches(benches, out_dir, args.quick, command, device)
    print(format_summary(summary))
    print(f"\nwrote {shown(out_dir)}/summary.md, summary.json and each benchmark's JSON, PNG and log")
    return exit_status(summary)


if __name__ == "__main__":
    sys.exit(main())
