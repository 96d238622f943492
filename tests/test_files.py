"""Files the package writes: strict JSON (no bare NaN or Infinity) and the writable-directory check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from onlinemix.core.files import json_text, unwritable_reason, write_json
from onlinemix.training.metrics import RunMetrics


def strict_loads(text: str):
    """json.loads that refuses the non-JSON words NaN, Infinity and -Infinity."""
    def refuse(word: str):
        raise AssertionError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_at_any_depth(tmp_path: Path) -> None:
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (np.float64("nan"), 2), "e": "NaN"}
    assert strict_loads(json_text(value)) == {"a": None, "b": [1.0, None, {"c": None}], "d": [None, 2], "e": "NaN"}
    write_json(tmp_path / "x.json", value)
    assert strict_loads((tmp_path / "x.json").read_text())["a"] is None
    with pytest.raises(TypeError):  # not JSON at all: an error, never a silent bare word
        json_text({"x": object()})


def test_metrics_rows_of_batches_without_synthetic_views_are_strict_json(tmp_path: Path) -> None:
    """A batch of fallbacks only has no mean age or reuse (NaN): the row holds null."""
    metrics = RunMetrics(tmp_path / "metrics.jsonl", None)
    stats = {"fresh": 0, "cached": 0, "disk": 0, "fallback": 4, "mean_age": math.nan, "mean_reuse": math.nan,
             "wait_s": 0.0}
    metrics.record(1, 0, stats, 0.0, True, loss=1.0)
    metrics.end_epoch(0)
    metrics.close()
    rows = [strict_loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["mean_age"], r["mean_reuse"]) for r in rows] == [(None, None), (None, None)]


def test_unwritable_reason_names_a_file_and_a_path_below_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert unwritable_reason(blocker) == "it is a file, not a directory"
    assert unwritable_reason(blocker / "below") == "Not a directory"
    assert unwritable_reason(tmp_path / "new" / "dir") is None and (tmp_path / "new" / "dir").is_dir()
