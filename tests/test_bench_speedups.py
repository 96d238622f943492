"""bench/speedups.py: its quick run measures every option and the student, and judges the targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import speedups  # noqa: E402


@pytest.mark.usefixtures("one_torch_thread")
def test_quick_run_measures_every_option_and_the_student(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.json"
    res = speedups.main(["--quick", "--num-images", "16", "--out", str(out)])
    assert json.loads(out.read_text())["digits_tiny"] == res["digits_tiny"]
    assert list(res["full_size"]) == ["32"] and list(res["full_size"]["32"]) == list(speedups.OPTIONS)
    assert all(rate > 0 for rate in res["full_size"]["32"].values())
    tiny = res["digits_tiny"]
    assert list(tiny) == [*speedups.OPTIONS, speedups.STUDENT]
    assert tiny["plain"]["steps"] == 10 and tiny["plain"]["guided"]
    student = tiny[speedups.STUDENT]
    assert not student["guided"] and student["steps"] < 10  # runs as distilled: few steps, no guidance pass
    assert all(0 <= row["class_kept"] <= 1 and row["img_s"] > 0 for row in tiny.values())
    names = [t["name"] for t in res["targets"]]
    assert len(names) == 4 and res["targets"][0]["status"] == "not measured here"  # no 256 px row when quick
    assert all(t["status"] in ("PASS", "MISS") for t in res["targets"][1:])
    printed = capsys.readouterr().out
    assert "x plain" in printed and "class kept" in printed and (tmp_path / "s.png").is_file()
