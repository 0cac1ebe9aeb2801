"""Which back-end a layer uses for a (B, V, S) step, and the cost model behind ``scoring="auto"``."""
from __future__ import annotations

from ..layers import tied

EXACT = ("reduced_ghost", "pairwise_ghost", "direct")
BYTE_COST = 16.0    # FLOP-equivalents per byte of temporaries


def choose_backend(requested: str, rule, b: int, v: int, s: int, k: int, *, multi_use: bool,
                   target_factors_available: bool, max_bytes: float) -> str:
    """The back-end one layer actually uses for a (B, V, S) step.

    A back-end the rule does not list in ``supports`` (embeddings: only the gather-dot of
    reduced_ghost) and parameters shared by several modules (tied weights, scored against their
    one collapsed target gradient) use reduced_ghost.
    ``auto`` minimises the modelled cost among the exact back-ends that fit ``max_bytes``: FLOPs
    plus ``BYTE_COST`` per byte of extra temporaries (materialised per-sample gradients are
    memory-bound: on a 2-core CPU ``direct`` measured 1.8x a plain step where FLOPs alone
    predicted it cheapest; see ``drpost bench``)."""
    exact = [name for name in EXACT if name in rule.supports]
    if multi_use or exact == ["reduced_ghost"]:
        return "reduced_ghost"
    if requested != "auto":
        return requested if requested in rule.supports else "reduced_ghost"
    best, best_cost = "reduced_ghost", None
    for name in exact:
        if name == "pairwise_ghost" and not target_factors_available:
            continue
        flops, extra = rule.cost(name, b, v, s, k)
        if extra > max_bytes:
            continue
        cost = flops + BYTE_COST * extra
        if best_cost is None or cost < best_cost:
            best, best_cost = name, cost
    return best


def choose_for_group(cfg, rules: list, calls: int, rule, b: int, v: int, s: int, k: int) -> str:
    """The back-end of a layer group: tied uses that layers/tied.py can score from factors
    (each called once) compare their ghost cost with the dense target's; ``sketch`` applies to
    single-use rules that support it; everything else goes through :func:`choose_backend`."""
    multi_use = len(rules) > 1 or calls > 1
    if multi_use and cfg.scoring != "reduced_ghost" and cfg.target_factors and calls == len(rules) \
            and tied.ghostable(rules):
        if cfg.scoring == "pairwise_ghost":
            return "pairwise_ghost"
        ghost, dense = tied.cost(rules, b, v, s)
        return "pairwise_ghost" if ghost < dense else "reduced_ghost"
    if cfg.scoring == "sketch":
        return "reduced_ghost" if (multi_use or "sketch" not in rule.supports) else "sketch"
    return choose_backend(cfg.scoring, rule, b, v, s, k, multi_use=multi_use,
                          target_factors_available=cfg.target_factors, max_bytes=cfg.direct_max_bytes)
