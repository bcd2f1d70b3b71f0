"""Seed intervals: Student-t half-widths match scipy's (an independent reference)."""

import math

import pytest

from nemo_plugins.utils.stats import format_interval, mean_interval


@pytest.mark.parametrize("values", [[1.0, 2.0], [0.3, 0.1, 0.2], [float(i) ** 1.5 for i in range(12)], list(range(40)), list(range(200))])
def test_mean_interval_matches_scipy(values):
    stats = pytest.importorskip("scipy.stats")
    mean, half = mean_interval(values)
    n = len(values)
    lo, hi = stats.t.interval(0.95, n - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert mean == pytest.approx((lo + hi) / 2)
    assert half == pytest.approx((hi - lo) / 2, rel=2e-3)


def test_one_value_has_no_interval():
    mean, half = mean_interval([0.5])
    assert mean == 0.5 and math.isnan(half) and format_interval([0.5], 2) == "0.50"
    assert format_interval([1.0, 3.0], 1) == "2.0 ± 12.7"
    with pytest.raises(ValueError):
        mean_interval([])
