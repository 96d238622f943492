"""Every GPU path in one command: the steps of ``bash bench/gpu_check.sh``, each judged against a target.

    bash bench/gpu_check.sh [OUT_DIR]                 # checks the install first; what to run on a new GPU machine
    python bench/gpu_check.py --out-dir DIR           # the steps alone
    python bench/gpu_check.py --only augment,ring     # some of them

Each step runs in its own process group with its output in OUT_DIR/<step>.log, under a time limit
(bench/steprunner.py); after every step OUT_DIR/gpu_check.json is rewritten with every row so far.

A row: the step, PASS / MISS / FAIL, its figure and the target it is judged against. FAIL: the step exited
non-zero, ran past its limit, or left no readable result, or what it measured is wrong (a kernel case
failed, no fresh view reached the trainer); MISS: it ran and missed a speed target, a finding rather than a
failure. The exit status is 1 when a row is FAIL, 2 when no CUDA device is visible (nothing runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import REPO, only_list
from steprunner import FAIL, MISS, PASS, REPORT, Step, Verdict, exit_status, format_table, run_steps

KERNEL_CASES = 13  # tests/triton_cases.py's cases at least (tests/test_triton_augment.py counts the same)
MiB = 2**20


# ----------------------------------------------------------------------------- judges

def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def judge_env(out: Path) -> Verdict:
    """The GPU, torch, and what auto chooses here, from ``python -m onlinemix env --json``."""
    info = read_json(out / "env.json")
    if not info["gpus"]:
        return Verdict(FAIL, f"torch {info['torch']['version']}, no GPU", "the environment report sees no GPU")
    gpu = info["gpus"][0]
    figure = (f"{gpu['name']} ({gpu['memory_gib']} GiB), torch {info['torch']['version']}, "
              f"Triton kernels {'load' if info['triton_kernels']['load'] else 'do not load'}, "
              f"attention auto: {info['attention_auto']}, views auto: {info['view_backend_auto']['backend']}")
    if info["conflicts"]:
        return Verdict(FAIL, figure, "; ".join(info["conflicts"]))
    return Verdict(PASS, figure)


def judge_kernel_cases(out: Path) -> Verdict:
    """Every Triton kernel case passed on the GPU (pytest's JUnit XML): none failed, errored or was skipped."""
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in ElementTree.parse(out / "triton-kernels.xml").getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    bad = counts["failures"] + counts["errors"] + counts["skipped"]
    figure = (f"{counts['tests'] - bad} of {counts['tests']} cases pass on cuda ({counts['failures']} failed, "
              f"{counts['errors']} errors, {counts['skipped']} skipped)")
    ok = bad == 0 and counts["tests"] >= KERNEL_CASES
    return Verdict(PASS if ok else FAIL, figure, "" if ok else "see triton-kernels.log")


def judge_targets(targets: list[dict[str, Any]], figure: str) -> Verdict:
    """A benchmark's own targets: MISS when one missed, FAIL when one could not be judged (did not run)."""
    statuses = {t["name"]: t["status"] for t in targets}
    unjudged = [name for name, status in statuses.items() if status not in (PASS, MISS)]
    if unjudged or not targets:
        return Verdict(FAIL, figure, f"not measured: {'; '.join(unjudged) or 'no target'}")
    missed = [name for name, status in statuses.items() if status == MISS]
    return Verdict(MISS if missed else PASS, figure, "missed: " + "; ".join(missed) if missed else "")


def judge_augment(out: Path) -> Verdict:
    """The Triton kernels' views/s against the torch backend on the GPU (bench/augment.py's GPU targets)."""
    res = read_json(out / "augment.json")
    rows = [r for r in res["rows"] if r["views_s"]["triton"] is not None]
    if not rows:
        return Verdict(FAIL, "-", "the Triton kernels did not run")
    worst = min(rows, key=lambda r: r["views_s"]["triton"])
    figure = (f"triton {worst['views_s']['triton']:,.0f} views/s, {min(r['triton_over_torch'] for r in rows):.2f}x "
              f"torch ({worst['views_s']['torch']:,.0f}); {res['config']['dtype']}, worst recipe")
    return judge_targets([t for t in res["targets"] if t["name"].startswith("GPU")], figure)


def generate_row_figure(r: dict[str, Any]) -> str:
    """One bench/generate.py row: dtype, attention, then images/s and peak memory, or why it did not run."""
    if r["status"] != "ok":
        return f"{r['dtype']} {r['attention']}: {r['status']}"
    regenerated = f", {r['retries']} regenerated" if r["retries"] else ""
    return (f"{r['dtype']} {r['attention']}: {r['img_s']:.2f} img/s, {r['peak_mem_bytes'] / MiB:,.0f} MiB peak"
            f"{regenerated}")


def judge_generate(name: str) -> Callable[[Path], Verdict]:
    """bench/generate.py's rows in ``name``: each one's images/s and peak memory; a row that errored fails."""
    def judge_rows(out: Path) -> Verdict:
        rows = read_json(out / name)["rows"]
        errors = [r["reason"] for r in rows if r["status"] == "error"]
        ok = any(r["status"] == "ok" for r in rows) and not errors
        return Verdict(PASS if ok else FAIL, "; ".join(generate_row_figure(r) for r in rows),
                       "; ".join(errors)[:300] or ("" if ok else "no row ran"))
    return judge_rows


def judge_online_run(out: Path) -> Verdict:
    """The run's summary: the trainer's and the producer's rates; at least one fresh view reached the trainer."""
    s = read_json(out / "run" / "shared-gpu" / "summary.json")
    views = s["views"]
    producer = "none" if s["producer_images_per_s"] is None else f"{s['producer_images_per_s']:.1f}"
    figure = (f"trainer {s['trainer_images_per_s']:.1f} img/s, producer {producer} img/s; second views "
              f"{views['fresh']} fresh, {views['cached']} cached, {views['fallback']} fallback")
    if not views["fresh"]:
        return Verdict(FAIL, figure, "no fresh view: the producer sharing the GPU delivered nothing")
    return Verdict(PASS, figure)


def judge_cache(out: Path) -> Verdict:
    """JPEG reads decoded on the GPU against the trainer's rate; raw shards must read back exactly."""
    res = read_json(out / "cache.json")
    row = res["resolutions"][0]
    jpeg, ratio = row["formats"]["jpeg"]["read_s"]["warm_verify"], row["read_over_trainer"]["jpeg_warm_verify"]
    figure = (f"jpeg {jpeg:,.0f} img/s decoded on {res['meta']['device']} ({ratio:.1f}x the trainer's "
              f"{row['trainer']['img_s']:,.0f}), raw {row['formats']['raw']['read_s']['warm_verify']:,.0f} img/s")
    if not row["formats"]["raw"]["exact"]:
        return Verdict(FAIL, figure, "raw shards did not read back exactly")
    return Verdict(PASS if ratio >= 1 else MISS, figure, "" if ratio >= 1 else "JPEG reads slower than the trainer")


def judge_ring(out: Path) -> Verdict:
    """The ring's pairs/s at 224 px against memcpy and a Queue (bench/ring.py's targets)."""
    res = read_json(out / "ring.json")
    figure = ", ".join(f"{t['value']:.2f}x {'memcpy' if 'memcpy' in t['name'] else 'Queue'}"
                       for t in res["targets"] if t["value"] is not None)
    return judge_targets(res["targets"], figure or "-")


# ----------------------------------------------------------------------------- the steps

def gpu_steps(out: Path, python: str = sys.executable) -> list[Step]:
    """The checks, in order, with limits adding up to well under 8 minutes with the kill grace."""
    bench = lambda script: (python, f"bench/{script}.py")  # noqa: E731
    return [
        Step("env", (python, "-m", "onlinemix", "env", "--json"), 30, "a GPU visible, no shadowed package",
             judge_env, (out / "env.json",), stdout="env.json"),
        Step("triton-kernels", (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/triton_cases.py",
                                f"--junitxml={out / 'triton-kernels.xml'}"), 60,
             f"every case equals the torch backend on the GPU (>= {KERNEL_CASES}, none skipped)", judge_kernel_cases,
             (out / "triton-kernels.xml",), env={"TRITON_INTERPRET": None}),
        Step("augment", (*bench("augment"), "--device", "cuda", "--dtype", "fp32", "--resolutions", "224",
                         "--batches", "256", "--recipes", "mixdiff_real,mixdiff_synthetic", "--repeats", "3",
                         "--torchvision-images", "8", "--torchvision-seconds", "0.5",
                         "--out", str(out / "augment.json")),
             35, "triton >= 150,000 views/s and >= 3x torch (224 px, batch 256, fp32 as training)", judge_augment,
             (out / "augment.json",)),
        Step("generate", (*bench("generate"), "--full-size", "--device", "cuda", "--dtypes", "fp16", "--attentions",
                          "sdpa,xformers", "--steps", "4", "--plain-steps", "4", "--batch-sizes", "8", "--repeats",
                          "2", "--plain-repeats", "1", "--tiny-vae", "off", "--channels-last", "off", "--out",
                          str(out / "generate.json")), 80,
             "full-size architecture, 512 px, 4 steps, batch 8: every row runs (xformers may be unavailable)",
             judge_generate("generate.json"), (out / "generate.json",)),
        Step("digits-tiny", (*bench("generate"), "--model", "digits-tiny", "--device", "cuda", "--resolution", "8",
                             "--dtypes", "fp16,fp32", "--attentions", "sdpa", "--steps", "10", "--plain-steps", "10",
                             "--batch-sizes", "64", "--repeats", "2", "--plain-repeats", "1", "--tiny-vae", "off",
                             "--channels-last", "off", "--out", str(out / "digits-tiny.json")), 25,
             "the bundled model, batch 64, fp16 and fp32: every row runs", judge_generate("digits-tiny.json"),
             (out / "digits-tiny.json",)),
        Step("online-run", (python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                            "--mixed_precision", "bf16", "--dynamo_backend", "no", "onlinemix/train.py",
                            "--gen-devices", "cuda:0", "--producer.memory-fraction", "0.5", "--generator.model",
                            "full-size-random", "--generator.resolution", "256", "--generator.steps", "4",
                            "--generator.batch-size", "8", "--train.epochs", "1", "--train.batch-size", "64",
                            "--probe.epochs", "50", "--report-to", "none", "--output-dir", str(out / "run"),
                            "--run-name", "shared-gpu"), 90,
             "accelerate launch, bf16, producer and trainer on cuda:0: one epoch, fresh views > 0", judge_online_run,
             (out / "run",)),
        Step("cache", (*bench("cache"), "--device", "cuda", "--resolutions", "224", "--mib", "32", "--dir", str(out),
                       "--out", str(out / "cache.json")), 35,
             "JPEG shards decoded with nvJPEG >= the trainer's img/s; raw exact", judge_cache, (out / "cache.json",)),
        Step("ring", (*bench("ring"), "--resolutions", "224", "--producers", "1,2", "--consumers", "1",
                      "--mib-per-config", "256", "--retries", "0", "--out", str(out / "ring.json")), 25,
             "ring at 224 px: bench/ring.py's targets against memcpy and a Queue", judge_ring, (out / "ring.json",)),
    ]


# ----------------------------------------------------------------------------- main

def no_cuda_reason() -> str | None:
    """Why the check cannot run here (no CUDA device), or None."""
    import torch

    if torch.cuda.is_available():
        return None
    return ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run it on a machine with a GPU")


def machine_meta(argv: Sequence[str]) -> dict[str, Any]:
    """The GPU, the versions and the command, for the report."""
    import torch

    return {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python bench/gpu_check.py", *argv])}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [s.name for s in gpu_steps(Path("."))]
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0],
                                epilog="steps, in order: " + ", ".join(names) + ". docs/benchmarks.md explains the table.")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "gpu-check",
                   help="where the logs, each step's JSON and gpu_check.json go (default bench/results/gpu-check)")
    p.add_argument("--only", default=None, help="comma-separated steps to run (default: all)")
    args = p.parse_args(argv)
    args.only = only_list(p, args.only, names, "step")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if problem := no_cuda_reason():
        print(problem, file=sys.stderr)
        return 2
    out = args.out_dir.resolve()
    steps = [s for s in gpu_steps(out) if args.only is None or s.name in args.only]
    meta = machine_meta(sys.argv[1:] if argv is None else argv)
    rows = run_steps(steps, out, meta)
    print(f"\ngpu check on {meta['device']} (torch {meta['torch']}, CUDA {meta['cuda']}), {meta['date']}\n")
    print(format_table(rows))
    failed = [r["step"] for r in rows if r["status"] == FAIL]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'no step failed'}; wrote {out / REPORT}")
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
