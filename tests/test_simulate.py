"""The simulator on cases whose outcome can be worked out by hand, and the planner's table for a fixed rates file."""

from __future__ import annotations

import json

import pytest

from onlinemix.core.config import load_config
from onlinemix.tools.plan import main as plan_main
from onlinemix.tools.simulate import Rates, simulate

STOPPED = 1e-9  # pairs/s: a producer that never finishes a batch


def config(**overrides: str):
    return load_config(None, {k.replace("__", "."): v for k, v in overrides.items()})


def test_generation_far_faster_than_training_serves_every_view_fresh() -> None:
    cfg = config(staleness__policy="wait", staleness__max_reuse="1", train__batch_size="32", train__epochs="3")
    sim = simulate(cfg, 256, Rates(gen_pairs_s=1e5, step_s=0.01))
    assert [e.fractions()["fresh"] for e in sim.epochs] == [1.0, 1.0, 1.0]
    assert sim.evicted_unserved == 0  # nothing generated is thrown away unserved
    assert sim.generated == 3 * 256 and sim.unserved_at_end == 0  # nor made past the last position
    assert sim.stall_fraction < 0.01
    assert sim.total().new_variations == 3 * 256  # a new variation of every image in every epoch


def test_stopped_generation_falls_back_to_real_views_or_serves_the_cache() -> None:
    real = simulate(config(staleness__policy="real", train__batch_size="32", train__epochs="2"), 64,
                    Rates(STOPPED, 0.01))
    assert [e.fractions()["fallback"] for e in real.epochs] == [1.0, 1.0]
    assert real.generated == 0
    # Two warm variations per image, served least used first, then youngest: 1, 0, 1, 0.
    cached = simulate(config(staleness__policy="cached", train__batch_size="32", train__epochs="4"), 64,
                      Rates(STOPPED, 0.01), warm_variations=2)
    assert [e.fractions()["disk"] for e in cached.epochs] == [1.0] * 4
    assert [e.mean_reuse for e in cached.epochs] == [0, 0, 1, 1]
    assert [e.mean_age for e in cached.epochs] == [0, 1, 1, 3]  # epoch - variation, never negative
    assert [e.new_variations for e in cached.epochs] == [64, 64, 0, 0]


def test_a_ring_view_serves_max_reuse_times_then_a_new_one_is_waited_for() -> None:
    # One batch of 32 images per epoch; a batch of 32 variations takes the producer 10 s, a step 10 ms.
    cfg = config(staleness__policy="wait", staleness__wait_timeout_s="20", staleness__max_reuse="3",
                 train__batch_size="32", generator__batch_size="32", train__epochs="6", ring__slots="64",
                 cache__enabled="false")
    sim = simulate(cfg, 32, Rates(gen_pairs_s=3.2, step_s=0.01))
    assert [(e.fresh, e.cached, e.fallback) for e in sim.epochs] == [(32, 0, 0), (0, 32, 0), (0, 32, 0)] * 2
    assert [e.mean_reuse for e in sim.epochs] == [0, 1, 2, 0, 1, 2]
    # Epoch 3 serves the views made for epoch 1 (made while epochs 1 and 2 reused epoch 0's).
    assert [e.mean_age for e in sim.epochs] == [0, 1, 2, 2, 3, 4]
    assert [round(e.stall_s) for e in sim.epochs] == [10, 0, 0, 10, 0, 0]
    assert sim.generated == 64


def test_rates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rates must be positive"):
        Rates(0.0, 1.0)



def test_the_planner_prints_every_split_marks_the_fastest_and_weighs_warming(tmp_path, capsys) -> None:
    rates = tmp_path / "throughput.json"
    rates.write_text(json.dumps({"generation": {"best_img_s": 40.0}, "training": {"img_s": 100.0}}))
    plan_main(["--gpus", "3", "--dataset-size", "2000", "--epochs", "3", "--rates", str(rates),
               "--train.batch-size", "32"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("1 node(s) x 3 devices, 2000 images, 3 epochs; per device 40 pairs/s generated, 100 img/s "
                      "trained; policy cached, max_reuse 4, ring 2048 slots")
    assert out[1].split() == ["gen", "train", "img/s", "lost", "epoch", "run", "var/img", "fresh", "synth", "age",
                              "cache", "GB"]
    rows = [line.split() for line in out[2:4]]
    assert [row[:2] for row in rows] == [["1", "2"], ["2", "1"]]
    # Two trainers need 200 img/s and one producer makes 40: throughput is the trainers' (the default never waits).
    assert float(rows[0][2]) == pytest.approx(200, rel=0.02) and rows[0][3] == "0.0%"
    assert float(rows[1][2]) == pytest.approx(100, rel=0.02)
    assert rows[0][-1] == "*" and len(rows[1]) == 11
    assert out[4] == "* best (fastest): 1 producer(s) + 2 trainer(s) per node"
    assert out[5].startswith("warm first: ") and out[5].endswith("online is better")


def test_the_planner_flags_splits_where_waiting_throttles_the_trainers(capsys) -> None:
    plan_main(["--gpus", "3", "--dataset-size", "2000", "--epochs", "3", "--gen-rate", "40", "--train-rate", "100",
               "--train.batch-size", "32", "--staleness.policy", "wait", "--staleness.wait-timeout-s", "1"])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:4]]
    # One producer makes 40 pairs/s for trainers that take 200 images/s: most batches wait for views.
    lost = [float(row[3].rstrip("%")) for row in rows]
    assert lost[0] > 20 and rows[0][11] == "!"
    assert float(rows[0][2]) == pytest.approx(200 * (1 - lost[0] / 100), rel=0.02)
    assert out[4].startswith(f"! policy wait throttles the trainers of 1+2 ({lost[0]:.0f}% of their speed lost)")


def test_the_planner_shows_variations_per_image_with_and_without_a_speedup(capsys) -> None:
    plan_main(["--gpus", "3", "--dataset-size", "2000", "--epochs", "3", "--gen-rate", "10", "--train-rate", "100",
               "--train.batch-size", "32", "--speedup", "fast=4"])
    out = capsys.readouterr().out.splitlines()
    start = out.index("distinct variations per image over the run (and the run's time), per generation speed-up:")
    assert out[start + 1].split() == ["gen", "train", "plain", "x1", "fast", "x4"]
    for line in out[start + 2:start + 4]:
        cells = line.replace("(", " ").replace(")", " ").split()
        plain, fast = float(cells[2]), float(cells[4])
        assert fast > 2 * plain > 0  # four times the generation rate: several times the variations
        assert cells[3] == cells[5]  # the trainers set the run's time (the default policy never waits)


@pytest.mark.parametrize("argv,said", [
    (["--gpus", "8", "--dataset-size", "100", "--gen-rate", "1", "--train-rate", "10", "--speedup", "x"],
     "argument --speedup: 'x': expected NAME=FACTOR with a factor > 0, e.g. deep-cache=2.1"),
    (["--gpus", "8"], "the following arguments are required: --dataset-size"),
    (["--gpus", "8", "--dataset-size", "100", "--gen-rate", "inf", "--train-rate", "10"],
     "argument --gen-rate: inf is not valid: expected a finite number > 0"),
    (["--gpus", "8", "--dataset-size", "100", "--gen-rate", "1", "--train-rate", "-3"],
     "argument --train-rate: -3 is not valid: expected a finite number > 0"),
])
def test_the_planner_answers_an_argument_error_in_two_lines(argv: list[str], said: str, capsys) -> None:
    """Not argparse's usage of every config key (70 lines) before the error."""
    with pytest.raises(SystemExit) as e:
        plan_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 2 and err[0].startswith("usage: onlinemix.plan --gpus N")
    assert err[1] == f"onlinemix.plan: error: {said}"
