"""Paired comparisons over seeds (drpost.stats) and the spectrum's paired-test tables, against
hand-computed values."""

import math

import pytest

from drpost.recipes.spectrum import comparison_tables, comparisons
from drpost.stats import NO_DIFFERENCE, paired, verdict


def test_paired_t_test_matches_the_hand_computed_statistic():
    a = {0: 3.0, 1: 5.0, 2: 7.0, 9: 1.0}
    b = {0: 2.0, 1: 3.0, 2: 4.0}          # seed 9 has no partner and is left out
    t = paired(a, b)
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3) with 2 degrees of freedom
    assert (t.n, t.seeds) == (3, (0, 1, 2))
    assert t.mean == pytest.approx(2.0) and t.se == pytest.approx(1 / math.sqrt(3))
    assert t.t == pytest.approx(2 * math.sqrt(3))
    # two-sided p for t = 2 sqrt(3), df 2: 1 - t / sqrt(t^2 + 2) (the Student t CDF with 2 df)
    assert t.p == pytest.approx(1 - t.t / math.sqrt(t.t ** 2 + 2), rel=1e-9)
    assert verdict(t, lower_is_better=False) == NO_DIFFERENCE   # p = 0.074
    strong = paired({i: 10.0 + i + 0.01 * (i % 2) for i in range(5)}, {i: float(i) for i in range(5)})
    assert strong.p < 1e-6
    assert verdict(strong, lower_is_better=False) == "better" and verdict(strong, lower_is_better=True) == "worse"


def test_degenerate_pairs_give_no_p_value_and_no_verdict():
    one = paired({0: 1.0}, {0: 0.0})
    assert (one.n, one.mean, one.se, one.p) == (1, 1.0, None, None)
    same = paired({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})   # both differences are 1: no spread
    assert same.mean == 1.0 and same.p is None and verdict(same, True) == NO_DIFFERENCE
    rounding = paired({0: 0.3, 1: 0.31}, {0: 0.2, 1: 0.21})   # equal up to float rounding: still no spread
    assert rounding.p is None
    assert paired({0: float("nan")}, {0: 1.0}).n == 0
    assert paired({}, {}).mean is None


def _run(method, frac, seed, ppl, em):
    return {"method": method, "frac": frac, "seed": seed, "test_ppl": ppl, "exact_match": em,
            "metrics": ["exact_match"]}


def test_comparisons_against_standard_and_the_best_baseline():
    runs = []
    for s in range(4):
        runs += [_run("standard", None, s, 10.0 + s, 0.20 + 0.01 * s),
                 _run("greedy", 0.5, s, 9.0 + s + 0.1 * (s % 2), 0.30 + 0.01 * s),   # the best baseline on both
                 _run("random", 0.5, s, 12.0 + s, 0.10),
                 _run("layerwise", 0.5, s, 8.0 + s + 0.2 * (s % 2), 0.31 + 0.01 * s + 0.002 * (s % 2))]
    em = {(r["method"], r["frac"]): r for r in comparisons(runs, "exact_match")}
    lw = em[("layerwise", 0.5)]
    assert lw["best_baseline"] == "greedy 0.5"
    assert lw["vs_standard"].mean == pytest.approx(0.111) and lw["vs_standard_verdict"] == "better"
    assert lw["vs_best"].mean == pytest.approx(0.011) and lw["vs_best"].p < 0.05
    assert em[("greedy", 0.5)]["best_baseline"] == "standard"   # a baseline is compared with the others
    assert "vs_standard" not in em[("standard", None)]
    ppl = {(r["method"], r["frac"]): r for r in comparisons(runs, "test_ppl")}
    assert ppl[("layerwise", 0.5)]["vs_best"].mean == pytest.approx(-0.95)
    assert ppl[("layerwise", 0.5)]["vs_best_verdict"] == "better"          # lower perplexity is better
    assert ppl[("random", 0.5)]["vs_standard_verdict"] == NO_DIFFERENCE   # +2 every seed: no spread, no test
    text = comparison_tables(runs)
    assert "| layerwise 0.5 | 4 | 0.326 | +0.111 ± 0.001 |" in text
    assert "| greedy 0.5 |" in text and "test perplexity" in text and "p < 0.05" in text


def test_summary_shows_the_offline_selection_cost_only_when_there_is_one():
    from drpost.recipes.spectrum import format_summary, summarise

    def row(method, seed, cost=None):
        return {"method": method, "frac": None, "kept": 1.0, "seed": seed, "test_ppl": 10.0 + seed,
                "exact_match": 0.5, "seconds_per_step": 2.0, "metrics": ["exact_match"],
                "selection_cost_in_steps": cost}

    plain = [row("standard", 0), row("standard", 1)]
    assert "selection cost" not in format_summary(summarise(plain), ["exact_match"])
    table = format_summary(summarise(plain + [row("offline", 0, 40.0), row("offline", 1, 44.0)]), ["exact_match"])
    assert "selection cost (steps) |" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| - |") and table.splitlines()[3].endswith("| 42 ± 2 |")
