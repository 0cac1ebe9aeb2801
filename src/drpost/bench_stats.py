"""Statistics of ``drpost bench`` (:mod:`drpost.bench`) that hold on a noisy, shared machine.

The bench alternates the variants inside every repetition (plain, then each drpost variant), so the
``i``-th step of a variant and the ``i``-th plain step ran seconds apart under the same machine
load. A *pair ratio* is ``variant step i / plain step i``; the report gives the median of the pair
ratios and their interquartile range (IQR), for the wall time and for the process CPU time
(``time.process_time``: every thread's CPU seconds, which another process on the machine steals
much less of than wall time; with ``OMP_WAIT_POLICY=PASSIVE`` so that idle OpenMP threads sleep
instead of spinning CPU time away).

Two variants are *ranked* only when their IQRs do not overlap; otherwise the report says that the
spread is too large to rank them.
"""
from __future__ import annotations

import statistics

__all__ = ["pair_ratios", "summary", "rank", "too_noisy"]


def pair_ratios(times: list[float], plain: list[float]) -> list[float]:
    """``times[i] / plain[i]`` for the repetitions both have (the same-repetition plain step)."""
    return [t / p for t, p in zip(times, plain) if p > 0]


def summary(values: list[float]) -> dict:
    """Median and quartiles (``statistics.quantiles``, inclusive method); one value: all three equal."""
    if not values:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "n": 0}
    if len(values) == 1:
        v = values[0]
        return {"median": v, "q1": v, "q3": v, "n": 1}
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "n": len(values)}


def rank(rows: dict[str, dict]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``rows``: variant -> :func:`summary`. Returns (ranked, unrankable): ``(a, b)`` in ranked means a is
    cheaper than b with disjoint IQRs (a's q3 < b's q1); unrankable lists the pairs whose IQRs overlap.
    Pairs are taken in order of the medians."""
    names = sorted(rows, key=lambda k: rows[k]["median"])
    ranked, unrankable = [], []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (ranked if rows[a]["q3"] < rows[b]["q1"] else unrankable).append((a, b))
    return ranked, unrankable


def too_noisy(s: dict, limit: float = 0.10) -> bool:
    """The IQR is wider than ``limit`` of the median (a single ratio says little then)."""
    return s["n"] > 1 and (s["q3"] - s["q1"]) > limit * abs(s["median"])


def cycle_ratio(every: int, t, t_plain, c, c_plain) -> dict | None:
    """The separate strategy with ``refresh_every`` = ``every`` > 1: the ratio of the summed wall and CPU
    times over the first whole refresh cycles (n = the largest multiple of ``every`` timed steps; any
    ``every`` consecutive steps hold one refresh), i.e. the amortised cost that the median of the pairs,
    mostly non-refresh steps, hides. None when there is no cycle to amortise over."""
    if every <= 1 or len(t) < every:
        return None
    n = len(t) // every * every
    return {"steps": n, "refresh_every": every, "wall": sum(t[:n]) / sum(t_plain[:n]),
            "cpu": sum(c[:n]) / sum(c_plain[:n])}
