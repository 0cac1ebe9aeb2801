"""Paired comparisons over seeds, with verdicts only where they are significant.

Two methods run on the same seeds share their data draw (target rows, test split, general pool), so
they are compared *paired by seed*: the differences ``a(seed) - b(seed)``, their mean, standard error
and a two-sided paired t-test (``scipy.stats.ttest_rel``). :func:`verdict` calls a difference a win or
a loss only where ``p < alpha``; everywhere else it says "no difference shown".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = ["Paired", "paired", "verdict", "ALPHA", "NO_DIFFERENCE"]

ALPHA = 0.05
NO_DIFFERENCE = "no difference shown"


@dataclass(frozen=True)
class Paired:
    """``a - b`` paired by seed: n pairs, mean difference, its standard error, the t statistic and
    the two-sided p-value (None with fewer than 2 pairs or when every difference is equal)."""
    n: int
    mean: Optional[float]
    se: Optional[float]
    t: Optional[float]
    p: Optional[float]
    seeds: tuple = ()


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """Compare ``a`` and ``b`` (value per seed) on the seeds both have, with finite values."""
    from scipy import stats

    seeds = tuple(sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s])))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(diffs)
    if n == 0:
        return Paired(0, None, None, None, None, seeds)
    mean = sum(diffs) / n
    if n < 2:
        return Paired(n, mean, None, None, None, seeds)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    if sd <= 1e-12 * max(1.0, abs(mean)):  # every pair differs by the same amount (up to rounding): no spread
        return Paired(n, mean, se, None, None, seeds)
    res = stats.ttest_rel([float(a[s]) for s in seeds], [float(b[s]) for s in seeds])
    return Paired(n, mean, se, float(res.statistic), float(res.pvalue), seeds)


def verdict(test: Paired, lower_is_better: bool, alpha: float = ALPHA) -> str:
    """"better" / "worse" where the paired test is significant (p < alpha), else "no difference shown"."""
    if test.p is None or test.mean is None or not test.p < alpha:
        return NO_DIFFERENCE
    better = test.mean < 0 if lower_is_better else test.mean > 0
    return "better" if better else "worse"


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
