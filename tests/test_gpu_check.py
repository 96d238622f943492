"""bench/gpu_check.sh on the CPU: its step runner with steps that pass, fail and hang, and its refusal to start
without a GPU. The GPU steps themselves need a GPU; here their limits and their command lines are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import steprunner  # noqa: E402
from steprunner import FAIL, MISS, PASS, Step, Verdict  # noqa: E402


def read_figure(name: str):
    """A judge: PASS with the figure the step wrote to <name>.txt (a step that wrote none has no result)."""
    return lambda out: Verdict(PASS, (out / f"{name}.txt").read_text())


def python_step(name: str, code: str, limit_s: float, judge=None, **kwargs) -> Step:
    """A step running ``code`` in a fresh Python, judged by ``judge`` (default: ``read_figure``)."""
    return Step(name, (sys.executable, "-c", code), limit_s, f"{name}'s target", judge or read_figure(name), **kwargs)


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (Z: a zombie, dead but not reaped), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_failing_and_a_hanging_step_are_failed_rows_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "ok.json"
    stale.write_text('{"left": "by an earlier run"}')
    # A hanging step that ignores SIGTERM, with a child of its own that does too (a trainer stuck in a CUDA call
    # and its producer): both must be killed at the limit.
    hang = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
            f"open({str(out / 'child.pid')!r}, 'w').write(str(child.pid))\n"
            "print('hanging', flush=True)\n"
            "time.sleep(600)\n")
    steps = [
        python_step("fails", "import sys; print('first line'); sys.exit('the error it ends with')", 30),
        python_step("hangs", hang, 1.5),
        python_step("ok", f"import json; json.dump({{'rate': 12.5}}, open({str(stale)!r}, 'w'))", 30,
                    judge=lambda out: Verdict(PASS, f"{json.loads((out / 'ok.json').read_text())['rate']} img/s"),
                    results=(stale,)),
        python_step("misses", "pass", 30, judge=lambda out: Verdict(MISS, "1 img/s", "slower than the target")),
        python_step("no-result", "pass", 30, judge=lambda out: Verdict(PASS, (out / "absent.json").read_text())),
    ]
    meta = {"device": "test"}
    rows = steprunner.run_steps(steps, out, meta, grace_s=0.5)

    assert [(r["step"], r["status"]) for r in rows] == [("fails", FAIL), ("hangs", FAIL), ("ok", PASS),
                                                        ("misses", MISS), ("no-result", FAIL)]
    fails, hangs, ok, misses, no_result = rows
    assert fails["returncode"] == 1 and not fails["timed_out"] and fails["figure"] == "-"
    assert fails["reason"] == "exit status 1: the error it ends with"
    assert "first line" in (out / "fails.log").read_text()
    assert hangs["timed_out"] and hangs["returncode"] == -9 and hangs["reason"] == "killed at its limit of 1.5s"
    assert (out / "hangs.log").read_text() == "hanging\n"
    assert process_state(int((out / "child.pid").read_text())) in (None, "Z")  # the group was killed, child too
    assert ok["figure"] == "12.5 img/s" and ok["reason"] == "" and ok["target"] == "ok's target"
    assert misses["reason"] == "slower than the target"
    assert no_result["reason"].startswith("no readable result (FileNotFoundError")
    assert steprunner.exit_status(rows) == 1
    assert steprunner.exit_status([ok, misses]) == 0  # a MISS is a finding, not a failure

    report = json.loads((out / "gpu_check.json").read_text())
    assert report == {"meta": meta, "finished": True, "steps": rows, "failed": ["fails", "hangs", "no-result"]}
    table = steprunner.format_table(rows)
    assert "| hangs | FAIL | - | hangs's target |" in table and "| ok | PASS | 12.5 img/s | ok's target |" in table
    assert "hangs: FAIL: killed at its limit of 1.5s (log: hangs.log)" in table


def test_the_report_holds_every_finished_step_while_a_step_runs(tmp_path: Path) -> None:
    """A check that is itself killed keeps the rows of the steps before."""
    out = tmp_path / "out"
    report = out / steprunner.REPORT
    seen = []
    steps = [python_step("first", "pass", 30, judge=lambda o: Verdict(PASS, "ran")),
             python_step("second", "pass", 30, judge=lambda o: seen.append(json.loads(report.read_text()))
                         or Verdict(PASS, "ran"))]
    steprunner.run_steps(steps, out, {}, grace_s=0.5)
    (during,) = seen
    assert during["finished"] is False and [r["step"] for r in during["steps"]] == ["first"]


def test_a_step_gets_its_environment_and_its_stdout_file(tmp_path: Path) -> None:
    code = "import json, os; print(json.dumps([os.environ.get('GONE'), os.environ['HF_HUB_OFFLINE']]))"
    step = python_step("env", code, 30, judge=lambda out: Verdict(PASS, str(json.loads((out / "e.json").read_text()))),
                       stdout="e.json", env={"GONE": None})
    os.environ["GONE"] = "set in the parent"
    try:
        row = steprunner.run_step(step, tmp_path)
    finally:
        del os.environ["GONE"]
    assert row["status"] == PASS and row["figure"] == "[None, '1']"


def test_the_step_limits_fit_the_eight_minutes() -> None:
    steps = gpu_check.gpu_steps(Path("/out"))
    worst = sum(s.limit_s + steprunner.KILL_GRACE_S for s in steps)
    assert worst <= 430, worst  # with the install check and start-up, under 480 s
    assert len({s.name for s in steps}) == len(steps)


@pytest.mark.parametrize("name", ["augment", "cache", "generate", "digits-tiny"])
def test_each_benchmark_step_is_a_valid_command_line(name: str) -> None:
    """The flags a GPU step passes parse with its script's own parser (a typo would cost a GPU run)."""
    (step,) = [s for s in gpu_check.gpu_steps(Path("/out")) if s.name == name]
    script = Path(step.command[1]).stem
    module = __import__(script)
    args = module.parse_args(list(step.command[2:]))
    assert str(args.out).startswith("/out/")


def test_gpu_check_stops_at_once_without_a_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                                       "PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False; "
                                   "CUDA_VISIBLE_DEVICES=): run it on a machine with a GPU")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("counts, status", [({"tests": 13}, PASS), ({"tests": 13, "skipped": 13}, FAIL),
                                            ({"tests": 13, "failures": 1}, FAIL), ({"tests": 5}, FAIL)])
def test_kernel_cases_pass_only_when_every_case_ran_and_passed(tmp_path: Path, counts: dict, status: str) -> None:
    """Skipped cases (no triton) or too few are no check of the kernels."""
    attributes = " ".join(f'{k}="{v}"' for k, v in counts.items())
    (tmp_path / "triton-kernels.xml").write_text(f'<testsuites><testsuite name="pytest" {attributes}/></testsuites>')
    assert gpu_check.judge_kernel_cases(tmp_path).status == status


def generate_row(attention: str, status: str) -> dict:
    return {"dtype": "fp16", "attention": attention, "status": status, "reason": f"{attention} {status}",
            "img_s": 2.5, "peak_mem_bytes": 3 * 2**30, "retries": 0}


def test_a_generator_row_that_errors_fails_and_an_unavailable_backend_does_not(tmp_path: Path) -> None:
    path = tmp_path / "generate.json"
    judge = gpu_check.judge_generate("generate.json")
    path.write_text(json.dumps({"rows": [generate_row("sdpa", "ok"), generate_row("xformers", "unavailable")]}))
    assert judge(tmp_path) == Verdict(PASS, "fp16 sdpa: 2.50 img/s, 3,072 MiB peak; fp16 xformers: unavailable")
    path.write_text(json.dumps({"rows": [generate_row("sdpa", "error"), generate_row("xformers", "ok")]}))
    assert judge(tmp_path).status == FAIL and judge(tmp_path).reason == "sdpa error"
