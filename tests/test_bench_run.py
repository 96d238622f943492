"""``python -m bench``: every script in its own process, one summary of every target; and bench/precompute.py's
quick run through it. Timings are never asserted: they depend on the machine and its load."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onlinemix.exchange.ring import SHM_DIR

BENCH = Path(__file__).resolve().parent.parent / "bench"

REPORTS = '''
import json, sys
sys.path.insert(0, {bench!r})
from common import target
out = sys.argv[sys.argv.index("--out") + 1]
targets = [target("ratio on this machine", 2.0, 1.5, detail="quick" if "--quick" in sys.argv else "default"),
           target("ratio on a GPU", None, 3.0)]
json.dump({{"meta": {{"other_processes_cores": 0.1}}, "targets": targets, "plot": None}}, open(out, "w"))
'''
FAILS = 'import sys\nprint("loading the model...")\nsys.exit("error: no file named model_index.json in /models/sd")\n'
WRITES = 'import json, sys\njson.dump({}, open(sys.argv[sys.argv.index("--out") + 1], "w"))\n'
NO_TARGET = WRITES.format('{"meta": {}, "targets": []}')
UNLISTED = WRITES.format('{"meta": {}}')


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # run.py imports its helpers as `common`, as the scripts do
    import run
    return run


def test_a_failing_script_is_reported_and_the_others_still_run(runner, tmp_path: Path) -> None:
    scripts = {"fails": FAILS, "reports": REPORTS.format(bench=str(BENCH)), "plain": NO_TARGET, "unlisted": UNLISTED}
    for name, text in scripts.items():
        (tmp_path / f"{name}.py").write_text(text)
    benches = tuple(runner.Bench(name, f"what {name} measures", tmp_path / f"{name}.py") for name in scripts)
    summary = runner.run_benches(benches, tmp_path / "out", True, "python -m bench --quick", "cpu-2core")

    assert [r["bench"] for r in summary["benches"]] == ["fails", "reports", "plain", "unlisted"]
    fails, reports, _, unlisted = summary["benches"]
    assert fails["status"] == "FAILED" and fails["returncode"] == 1
    assert fails["error"] == "exit status 1: error: no file named model_index.json in /models/sd"
    assert (tmp_path / "out" / "fails.log").read_text().startswith("loading the model...")
    assert reports["targets"][0]["detail"] == "quick"  # --quick reached the script
    assert unlisted["status"] == "FAILED" and 'unlisted.json has no "targets" list' in unlisted["error"]
    assert [(r["bench"], r["status"]) for r in summary["rows"]] == [
        ("fails", "FAILED"), ("reports", "PASS"), ("reports", "not measured here"), ("plain", "no target"),
        ("unlisted", "FAILED")]
    assert runner.exit_status(summary) == 1

    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == summary["rows"]
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| reports | PASS | ratio on this machine | 2.00 | >= 1.5 |" in table
    assert "| reports | not measured here | ratio on a GPU |  | >= 3 |" in table
    assert "1 PASS, 0 MISS, 1 not measured here, 2 failed" in table


def test_python_m_bench_lists_the_benchmarks() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generate, ring, cache, data, augment, throughput, precompute" in " ".join(proc.stdout.split())
    assert "--only" in proc.stdout and "--quick" in proc.stdout and "--out-dir" in proc.stdout


def test_only_names_the_unknown_benchmark(runner, capsys) -> None:
    with pytest.raises(SystemExit):
        runner.parse_args(["--only", "ring,tradeof"])
    assert "unknown benchmark(s) tradeof; known: generate, ring," in capsys.readouterr().err


def test_quick_run_of_precompute_end_to_end(runner, tmp_path: Path, capsys) -> None:
    # `python -m bench --quick --only precompute --out-dir DIR`, its main called here: the script still runs in its
    # own process, as every benchmark does.
    status = runner.main(["--quick", "--only", "precompute", "--out-dir", str(tmp_path)])
    assert status == 0, (tmp_path / "precompute.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["bench"], r["status"]) for r in summary["rows"]] == [("precompute", "no target")]
    assert summary["meta"]["command"] == "python -m bench --quick --only precompute --out-dir " + str(tmp_path)
    assert "| precompute | no target |" in capsys.readouterr().out

    res = json.loads((tmp_path / "precompute.json").read_text())
    c = res["config"]
    assert (c["variations"], c["epochs"], res["meta"]["quick"]) == ([1], 2, True)
    assert c["images"] % c["batch_size"] == 0  # every image is served once per epoch
    pre, online = res["rows"]
    assert (pre["way"], pre["setting"], online["way"], online["setting"]) == (
        "precompute", "K=1", "online", "max_reuse=2")
    # The paper's way: one variation of every image, served from the cache in both epochs.
    assert pre["warm_generated"] == pre["cache_variations"] == c["images"]
    assert (pre["disk"], pre["fresh"], pre["fallback"]) == (2 * c["images"], 0, 0)
    assert pre["distinct_per_image"] == 1.0 and pre["fresh_fraction"] == 0.5
    assert pre["wall_s"] == pre["warm_s"] + pre["train_s"]
    # Online: every second view accounted for; a fresh view is a new variation, which the producer also cached.
    assert online["second_views"] == 2 * c["images"] and online["fresh"] > 0
    assert online["cache_variations"] >= online["first_servings"] == online["fresh"]
    assert online["fresh_fraction"] == online["fresh"] / online["second_views"]
    assert set(res["pareto"]) <= {"precompute K=1", "online max_reuse=2"} and res["pareto"]
    assert (tmp_path / res["plot"]).stat().st_size > 0
    assert not list(Path(tmp_path).glob(".precompute-bench-*"))
    # The online run's ring is gone (named in its log; not a global /dev/shm diff, which other processes disturb).
    rings = re.findall(r"ring (onlinemix-[0-9a-f-]+): ", (tmp_path / "precompute.log").read_text())
    assert len(rings) == 1 and not (SHM_DIR / rings[0]).exists()
