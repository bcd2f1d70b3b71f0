"""Means with Student-t confidence intervals, for results reported over a few seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

# two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30; beyond, 1.960 + 2.5/df
# (within 0.1% of the exact quantile)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval); the half-width is nan for one value
    (one seed says nothing about the spread)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = _T95[df - 1] if df <= len(_T95) else 1.960 + 2.5 / df
    return mean, t * sd / math.sqrt(n)


def format_interval(values: Sequence[float], digits: int = 4) -> str:
    """'mean ± half-width' (or just the mean for one value)."""
    mean, half = mean_interval(values)
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"
