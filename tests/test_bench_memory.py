"""bench/memory.py: the saved-tensor count against a hand-computed case, and its quick run's JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import memory  # noqa: E402


@pytest.mark.parametrize("batch", [3, 5])
def test_saved_bytes_count_what_autograd_keeps_but_parameters(batch: int) -> None:
    # Linear saves its input (the weight is a parameter: counted apart), ReLU its output; the shared
    # storage of Linear's output and ReLU's in-place result is one storage.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    x = torch.rand(batch, 8)
    saved = memory.saved_bytes(lambda: model(x), model.parameters())
    assert saved == batch * (8 + 16) * 4
    # Without the exclusion the second layer's weight shows (the first's is not saved: its input needs no
    # gradient).
    assert memory.saved_bytes(lambda: model(x), []) == saved + model[2].weight.numel() * 4


def test_quick_run_estimates_a_recipe(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    recipe = memory.RECIPES[0].parent / "in100-simclr.yaml"  # the smallest head: the quickest to build
    res = memory.main(["--quick", "--recipes", str(recipe), "--resolution", "32", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == res["rows"]
    (row,) = res["rows"]
    assert row["recipe"] == recipe.name and row["view_sizes"] == [32, 32] and row["batch_size"] == 256
    assert row["activation_bytes_per_sample"] > 0 and row["saved_bytes"][0] < row["saved_bytes"][1]
    states = ("parameters", "gradients", "optimizer", "teacher")
    assert row["total_bytes"] == pytest.approx(row["activation_bytes"] + sum(row[f"{k}_bytes"] for k in states))
    assert row["optimizer_bytes"] == row["parameters_bytes"]  # LARS: one momentum buffer
    assert row["fits"] == (row["total_bytes"] <= 70e9)
    (t,) = res["targets"]
    assert t["status"] == ("PASS" if row["fits"] else "MISS") and t["op"] == "<="
