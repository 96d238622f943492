"""Means and 95% Student t intervals over seeds, and paired differences between two settings run with the same
seeds. Written out here because scipy is not among the project's dependencies."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# two-sided 95% quantile of Student's t (0.975), for 1 to 30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: the table up to 30, beyond it the
    Cornish-Fisher expansion around the normal quantile (within 0.001 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean, standard deviation and the 95% t interval of the mean (``low``, ``high``, ``half``) of ``values``;
    the interval is None for a single value, whose spread is unknown."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "half": None, "low": None, "high": None}
    std = statistics.stdev(values)
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half": half, "low": mean - half, "high": mean + half}


def paired(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any] | None:
    """The mean difference ``values - baseline`` over the seeds both have, with its paired 95% t interval: the
    seed's shared data order and initialisation cancel out of each difference. None without a common seed."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    return {**interval([values[s] - baseline[s] for s in seeds]), "seeds": seeds}
