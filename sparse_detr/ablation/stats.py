"""Intervals over seeds: the mean of a measurement over the seeds a variant was trained with, and the paired
difference of two variants trained with the same seeds, each with a Student-t 95 % confidence interval.

Pairing by seed removes what two runs of one seed share (the same data order and augmentations, and for
variants of one architecture the same initial weights), so a difference is measured against its own spread
over seeds rather than against the sum of both variants' spreads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values, their sample standard deviation ``sd`` and the ``CONFIDENCE`` interval of the
    mean, ``[low, high]`` (NaN when ``n`` < 2: one value gives no interval)."""

    mean: float
    sd: float
    n: int
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies on one side of zero; None when there is no interval."""
        if math.isnan(self.low):
            return None
        return bool(self.low > 0 or self.high < 0)


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` (NaNs left out: a metric a split cannot give) with its t interval."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, 0, math.nan, math.nan)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, n, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, df=n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """``a - b`` over the seeds both have (seed -> value), as the interval of the per-seed differences."""
    return mean_interval([a[seed] - b[seed] for seed in sorted(set(a) & set(b))])
