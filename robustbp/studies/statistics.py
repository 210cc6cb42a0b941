"""The statistics of a study's report: mean ± standard deviation over seeds, and the Wilcoxon
rank-sum test (the exact two-sided Mann–Whitney U, as the papers used) of a method against the
study's baseline. No correction for multiple comparisons, as in the papers; reports say so."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import mannwhitneyu


def summary(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n); the deviation is nan for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summary of no values")
    deviation = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), deviation, len(values)


@dataclass(frozen=True)
class RankSum:
    """The rank-sum test of `method` against `baseline`: U statistic, two-sided p-value, and
    whether p < alpha."""

    statistic: float
    p_value: float
    significant: bool


def rank_sum(method: Sequence[float], baseline: Sequence[float], alpha: float = 0.05) -> RankSum:
    """Exact two-sided Mann–Whitney U (Wilcoxon rank-sum) test. With 3 seeds against 3 the
    smallest possible p is 0.1: at least 4 against 4 (p ≥ 0.029) are needed to reach 0.05."""
    if len(method) < 1 or len(baseline) < 1:
        raise ValueError(f"rank_sum needs values on both sides, got {len(method)} and {len(baseline)}")
    result = mannwhitneyu(list(method), list(baseline), alternative="two-sided", method="exact")
    p_value = float(result.pvalue)
    return RankSum(float(result.statistic), p_value, p_value < alpha)
