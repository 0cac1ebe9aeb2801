"""Which back-end a layer uses for a (B, V, S) step, and the cost model behind ``scoring="auto"``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import tied

EXACT = ("reduced_ghost", "pairwise_ghost", "direct")
BYTE_COST = 16.0    # FLOP-equivalents per byte of temporaries


@dataclass(frozen=True)
class Measure:
    """What ``auto_calibration='measure'`` needs to time a layer's candidates (calibration.py):
    the factors' dtype and device, the share of steps that build the dense target (1 merged,
    1/refresh_every separate), when the target is already cached, the cache form the
    candidates must be able to read (None: any), and how many scored layers this step fed the
    layer's input tensor (q/k/v: 3; they share pairwise_ghost's input-side Gram)."""
    dtype: torch.dtype
    device: torch.device
    target_share: float
    cache_kind: str | None = None
    input_sharers: int = 1


def factors_fit(rule, v: int, s: int) -> bool:
    """Do V target rows of S tokens take no more memory as a Linear's factors (x and delta:
    V S (I + O)) than as its dense gradient (O I)? Then the separate strategy may cache them and
    score with pairwise_ghost, which then costs no more FLOPs than the dense scores either."""
    o, i = getattr(rule, "out_features", None), getattr(rule, "in_features", None)
    return o is not None and i is not None and v * s * (o + i) <= o * i


def choose_backend(requested: str, rule, b: int, v: int, s: int, k: int, *, multi_use: bool,
                   target_factors_available: bool, max_bytes: float, measure: Measure | None = None,
                   factor_cache: bool = False) -> tuple[str, str]:
    """(The back-end one layer actually uses for a (B, V, S) step, why).

    A back-end the rule does not list in ``supports`` (embeddings: only the gather-dot of
    reduced_ghost) and parameters shared by several modules (tied weights, scored against their
    one collapsed target gradient) use reduced_ghost.
    ``auto`` minimises the modelled cost among the exact back-ends that fit ``max_bytes``: FLOPs
    plus ``BYTE_COST`` per byte of extra temporaries (materialised per-sample gradients are
    memory-bound: on a 2-core CPU ``direct`` measured 1.8x a plain step where FLOPs alone
    predicted it cheapest; see ``drpost bench``). With ``measure`` (and a rule whose kernels
    calibration.py can time, i.e. Linear / Conv1D, and B >= 1) the fastest measured candidate wins
    instead."""
    exact = [name for name in EXACT if name in rule.supports]
    if multi_use:
        return "reduced_ghost", "parameter used by several calls: scored against its collapsed dense target"
    if exact == ["reduced_ghost"]:
        return "reduced_ghost", f"{type(rule).__name__} implements reduced_ghost only"
    if requested != "auto":
        if requested in rule.supports:
            return requested, "requested"
        return "reduced_ghost", f"{requested} is not implemented by {type(rule).__name__}"
    cached = measure.cache_kind if measure is not None else None
    if factor_cache and b == 0 and "pairwise_ghost" in exact:   # separate strategy: the form the target is cached in
        o, i = rule.out_features, rule.in_features
        if factors_fit(rule, v, s):
            return "pairwise_ghost", (f"target cached as factors: V*S*(I+O) = {v * s * (o + i)} <= O*I = {o * i} "
                                      "values")
        target_factors_available = False
    fits, why_not = [], []
    for name in exact:
        if name == "pairwise_ghost" and not (target_factors_available or cached == "pairwise_ghost"):
            why_not.append("pairwise_ghost: target kept dense (separate strategy)")
            continue
        if measure is not None and measure.cache_kind is not None and _cache_kind(name) != measure.cache_kind:
            why_not.append(f"{name}: the cached target is {measure.cache_kind}")
            continue
        flops, extra = rule.cost(name, b, v, s, k)
        if extra > max_bytes:
            why_not.append(f"{name}: {extra / 2 ** 20:.0f} MiB of temporaries > direct_max_mb")
            continue
        fits.append((name, flops + BYTE_COST * extra))
    if not fits:
        return "reduced_ghost", "; ".join(why_not) or "no other exact back-end"
    excluded = f" ({'; '.join(why_not)})" if why_not else ""
    from . import calibration

    if measure is not None and b >= 1 and len(fits) > 1 and calibration.measurable(rule):
        time_candidates = calibration.measure

        timings = time_candidates(rule, [n for n, _ in fits], b, v, s, k, measure.dtype, measure.device,
                                  measure.target_share)
        shared = _share_input_gram(timings, measure.input_sharers)
        best = min(timings, key=timings.get)
        shown = ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in sorted(timings.items(), key=lambda x: x[1]))
        return best, f"measured fastest: {shown}{shared}{excluded}"
    best, cost = min(fits, key=lambda x: x[1])
    shown = ", ".join(f"{n} {c:.3g}" for n, c in sorted(fits, key=lambda x: x[1]))
    return best, f"modelled cheapest (FLOPs + {BYTE_COST:g}/byte): {shown}{excluded}"


def _share_input_gram(timings: dict, n: int) -> str:
    """Charge pairwise_ghost of a layer whose input feeds n scored layers its time with the input
    Gram reused plus 1/n of the Gram (computed once between them); drop the reused timing from
    ``timings``. Returns the note for the reason ('' when it does not apply)."""
    from .calibration import REUSED

    reused = timings.pop(REUSED, None)
    full = timings.get("pairwise_ghost")
    if reused is None or full is None or n <= 1:
        return ""
    reused = min(reused, full)
    timings["pairwise_ghost"] = reused + (full - reused) / n
    return (f" (pairwise_ghost: input Gram shared by {n} layers; {full * 1e3:.3g} ms computing it, "
            f"{reused * 1e3:.3g} ms reusing it)")


def _cache_kind(name: str) -> str:
    from . import BACKEND_TABLE

    return BACKEND_TABLE[name].cache_kind


def choose_for_group(cfg, rules: list, calls: int, rule, b: int, v: int, s: int, k: int,
                     measure: Measure | None = None) -> tuple[str, str]:
    """The back-end of a layer group: tied uses that layers/tied.py can score from factors
    (each called once) compare their ghost cost with the dense target's; ``sketch`` applies to
    single-use rules that support it; everything else goes through :func:`choose_backend`."""
    multi_use = len(rules) > 1 or calls > 1
    tied_ghost = multi_use and cfg.scoring != "reduced_ghost" and calls == len(rules) and tied.ghostable(rules)
    if tied_ghost and cfg.factor_cache and b == 0:   # separate + auto, at capture: the form the target is cached in
        if tied.factors_fit(rules, v, s):
            return "pairwise_ghost", ("tied weight, target cached as factors: they take no more memory than "
                                      "the dense [Vocab, D] target")
    elif tied_ghost and measure is not None and measure.cache_kind == "pairwise_ghost":
        return "pairwise_ghost", "tied weight: the cached target is factors"
    elif tied_ghost and cfg.target_factors:
        if cfg.scoring == "pairwise_ghost":
            return "pairwise_ghost", "requested (tied: four cross terms from factors)"
        ghost, dense = tied.cost(rules, b, v, s)
        return ("pairwise_ghost" if ghost < dense else "reduced_ghost",
                f"tied weight, modelled: factor cross terms {ghost:.3g} vs dense target {dense:.3g}")
    if cfg.scoring == "sketch":
        if multi_use or "sketch" not in rule.supports:
            return "reduced_ghost", "sketch applies to single-use Linear layers; exact reduced_ghost here"
        return "sketch", "requested"
    return choose_backend(cfg.scoring, rule, b, v, s, k, multi_use=multi_use,
                          target_factors_available=cfg.target_factors, max_bytes=cfg.direct_max_bytes,
                          measure=measure, factor_cache=cfg.factor_cache)
