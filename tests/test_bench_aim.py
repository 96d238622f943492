"""bench/aim.py's parts: its intervals against hand-worked values, and a preset per setting that the training
config accepts with the setting's values (its runs are too long for the suite: --quick takes minutes)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from aimbench.runs import make_settings, per_epoch_cap, write_preset  # noqa: E402
from aimbench.stats import interval, paired, t975  # noqa: E402

from onlinemix.core.config import load_config  # noqa: E402


def test_intervals_are_student_t_over_seeds_and_differences_are_paired() -> None:
    cell = interval([1.0, 2.0, 3.0])  # std 1, 2 degrees of freedom
    assert cell["mean"] == 2 and cell["std"] == 1
    assert cell["half"] == pytest.approx(4.303 / math.sqrt(3)) and cell["low"] == pytest.approx(2 - cell["half"])
    assert interval([5.0])["half"] is None  # one seed: no spread to speak of
    diff = paired({0: 97.0, 1: 98.0, 2: 96.0, 3: 99.0}, {0: 96.0, 1: 97.0, 2: 95.5, 4: 90.0})
    assert diff["seeds"] == [0, 1, 2] and diff["mean"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert paired({0: 1.0}, {1: 1.0}) is None
    assert t975(40) == pytest.approx(2.021, abs=1e-3)  # beyond the table, by expansion


@pytest.mark.parametrize("name", list(make_settings(0.0, 0.3)))
def test_every_setting_writes_a_preset_the_training_config_accepts(name: str, tmp_path: Path) -> None:
    setting = make_settings(0.0, 0.3)[name]
    cap = per_epoch_cap(1438, 5)
    assert cap == 288
    cfg = load_config(write_preset(setting, "simclr", 3, cap, 1, tmp_path), {})
    assert cfg.train.pairing == setting.pairing and cfg.generator.seed == 3 and cfg.train.cpu_threads == 1
    assert cfg.cache.dir == str(tmp_path / f"{name}-seed3-cache")  # a cache of its own
    assert cfg.producer.max_pairs_per_epoch == (cap if setting.online else 0)
    assert cfg.offline == setting.precompute
    for section, values in setting.overrides.items():
        assert {k: getattr(getattr(cfg, section), k) for k in values} == values
