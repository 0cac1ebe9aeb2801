"""The report of ``drpost demo``: the printed table, the verdicts and the notes (also ``summary.txt``).

Everything here reads the demo's ``metrics`` dict (:func:`drpost.recipes.demo.run_demo`) and only
formats it: one run is one seed, so a gap between two methods is called a win only when it exceeds
the seed-to-seed spread seen in the feasibility probe, and even then the text asks for more seeds.
"""

from __future__ import annotations

import math

__all__ = ["format_table", "verdict", "notes", "PPL_NOISE_REL", "ROUGE_NOISE"]

# Seed-to-seed spread seen in the feasibility probe (two seeds, 50 steps): ~0.65-1.12 test
# perplexity points (~5 %) and 0.017 ROUGE-L. Gaps below these are reported as "within noise".
PPL_NOISE_REL = 0.05
ROUGE_NOISE = 0.02


def _f(v, fmt: str, width: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f"{'-':>{width}}"
    if abs(v) >= 1e5:  # e.g. the perplexity of a truncated test model
        fmt = ".2e"
    return f"{v:>{width}{fmt}}"


def _pct(v, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{f'{100 * v:.1f}%':>{width}}"


def format_table(metrics: dict) -> str:
    results, base = metrics["results"], metrics["base"]
    std = results.get("standard", {}).get("seconds_per_step_median")
    head = (f"{'method':<12} {'ppl before':>10} {'best':>7} {'final':>7} {'final/best':>10} {'ROUGE-L':>8} "
            f"{'s/step':>7} {'x std':>6} {'headline share: chosen':>23} {'batch':>6}")
    lines = [head, "-" * len(head)]
    lines.append(f"{'base model':<12} {_f(base['test_ppl'], '.2f', 10)} {'-':>7} {'-':>7} {'-':>10} "
                 f"{_f(base.get('rougeL'), '.3f', 8)} {'-':>7} {'-':>6} {'-':>23} {'-':>6}")
    for method, r in results.items():
        ratio = r["seconds_per_step_median"] / std if std else None
        chosen = r.get("chosen_headline_share")
        batch = r.get("batch_headline_share")
        lines.append(
            f"{method:<12} {_f(r['test_ppl_before'], '.2f', 10)} {_f(r['test_ppl_best'], '.2f', 7)} "
            f"{_f(r['test_ppl_final'], '.2f', 7)} {_f(r['final_over_best'], '.2f', 10)} "
            f"{_f(r.get('rougeL'), '.3f', 8)} {_f(r['seconds_per_step_median'], '.2f', 7)} {_f(ratio, '.2f', 6)} "
            f"{_pct(chosen, 23)} {_pct(batch, 6)}"
        )
    return "\n".join(lines)


def verdict(d_ppl: float, rel: float, d_rouge: float | None) -> str:
    """One comparison in words: each gap, whether it exceeds the probe's seed-to-seed spread, and
    whether the two metrics agree (lower perplexity and higher ROUGE-L are better)."""
    big_ppl = abs(rel) >= PPL_NOISE_REL
    text = f"final test ppl {d_ppl:+.2f} ({100 * rel:+.1f} %{', beyond' if big_ppl else ', within'} ~5 %)"
    signs = [("perplexity", -1 if d_ppl > 0 else 1, big_ppl)]
    if d_rouge is not None:
        big_rouge = abs(d_rouge) >= ROUGE_NOISE
        text += f", ROUGE-L {d_rouge:+.3f} ({'beyond' if big_rouge else 'within'} ~0.02)"
        signs.append(("ROUGE-L", 1 if d_rouge > 0 else -1, big_rouge))
    big = [(name, sign) for name, sign, b in signs if b]  # a gap within the spread counts as no signal
    if not big:
        return text + " - within the seed-to-seed spread of the feasibility probe: no win can be claimed"
    if len({sign for _, sign in big}) > 1:
        return text + " - the two metrics point in opposite directions: no win can be claimed"
    side = "better" if big[0][1] > 0 else "worse"
    what = "both metrics" if len(big) == len(signs) > 1 else " and ".join(name for name, _ in big)
    rest = "" if len(big) == len(signs) else " (the other within the spread)"
    return (text + f" - {side} on {what} beyond the probe's seed-to-seed spread{rest}, but this is one seed: "
            "rerun with other --seed values before reading it as an effect")


def notes(metrics: dict) -> str:
    cfg, results = metrics["config"], metrics["results"]
    n_test = metrics["data"]["tokenized"]["test"]
    out = [
        "What the columns measure:",
        f"  ppl      exp(token-mean cross-entropy) on the reply tokens of {n_test} held-out tech articles; "
        f"'best' is the lowest of the evaluations (every {cfg['eval_every'] or cfg['steps']} steps), "
        "'final' the last; final/best > 1 = the run got worse after its best point (over-fitting).",
        f"  ROUGE-L  F1 (rouge_score, stemmed) of greedy headlines (<= {cfg['max_new_tokens']} new tokens, first line) "
        "against the real headlines of the same test articles.",
        "  s/step   median wall time of one training step (backward + optimizer), x std = relative to standard.",
        f"  headline share  headline rows (the target-like kind, other BBC sections) among the (layer, row) pairs the "
        f"selection kept, vs their share of the general batches; standard keeps every row, random selection keeps "
        f"the batch share on average; k = {max(1, min(cfg['batch_size'], math.floor(cfg['batch_size'] * cfg['frac'])))} "
        f"of {cfg['batch_size']} rows per layer.",
        "",
    ]
    t = results.get("target_only")
    if t:
        out.append(f"target_only: best test ppl {t['test_ppl_best']:.2f} at step {t['best_step']}, final "
                   f"{t['test_ppl_final']:.2f} (x{t['final_over_best']:.2f} of its best)"
                   + (" - it over-fits its 16 examples." if t["final_over_best"] > 1.05 else "."))
    pairs = [(m, "standard") for m in ("global", "layerwise", "random", "rowwise", "filter", "greedy")]
    pairs += [(m, "random") for m in ("global", "layerwise")]
    for method, ref in pairs:
        r, s = results.get(method), results.get(ref)
        if not r or not s:
            continue
        d_ppl = r["test_ppl_final"] - s["test_ppl_final"]
        rel = d_ppl / s["test_ppl_final"]
        d_rouge = None if r.get("rougeL") is None or s.get("rougeL") is None else r["rougeL"] - s["rougeL"]
        out.append(f"{method} vs {ref}: " + verdict(d_ppl, rel, d_rouge) + ".")
    sel = [m for m in ("layerwise", "global", "random") if results.get(m, {}).get("chosen_headline_share") is not None]
    if sel:
        parts = [f"{m} {100 * results[m]['chosen_headline_share']:.1f} %" for m in sel]
        batch = results[sel[0]]["batch_headline_share"]
        out.append(f"Headline rows among the kept rows: {', '.join(parts)} (batch share {100 * batch:.1f} %).")
        rates = [f"{m} {results[m]['headline_pick_rate']:.2f}" for m in sel
                 if results[m].get("headline_pick_rate") is not None]
        if rates:
            out.append(f"A headline row present in a batch was kept by this share of the layers: {', '.join(rates)} "
                       f"(random = {cfg['frac']:g}, always = 1).")
    out.append(f"Single seed ({cfg['seed']}), {cfg['steps']} steps, one data order: treat small gaps as noise.")
    return "\n".join(out)
