"""Scoring back-ends: how the score s_i = <G_i, g_T> of each general sample is computed for a layer.

One contract, several costs (METHOD §2):
  reduced_ghost  collapse the target into its dense gradient G_T, then s_i = sum_s delta_s . (G_T x_s)
  pairwise_ghost keep the target factors; s_i = sum_v sum_{s,t} (delta_is . delta_vt)(x_is . x_vt)
  direct         materialise G_i [B, O, I] (chunked to a memory bound) and dot with G_T; the
                 materialised gradients are reused to build the chosen update
  sketch         factorised random projection of both factors (approximate, unbiased)
  auto           per layer, the cheapest exact back-end for the shapes at hand (cost model below)
Layer-type specifics live in the layer rules (drpost.layers); this module only chooses.
"""
from __future__ import annotations

from .sketch import LayerSketch, parse_sketch

BACKENDS = ("reduced_ghost", "pairwise_ghost", "direct", "sketch", "auto")
EXACT = ("reduced_ghost", "pairwise_ghost", "direct")
BYTE_COST = 16.0    # FLOP-equivalents per byte of temporaries


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown scoring back-end {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def choose_backend(requested: str, rule, b: int, v: int, s: int, k: int, *, multi_use: bool,
                   target_factors_available: bool, max_bytes: float) -> str:
    """The back-end one layer actually uses for a (B, V, S) step.

    Rules that only know one exact path (embeddings: gather-dot) and parameters shared by several
    modules (tied weights, scored against their one collapsed target gradient) use reduced_ghost.
    ``auto`` minimises the modelled cost among the exact back-ends that fit ``max_bytes``: FLOPs
    plus ``BYTE_COST`` per byte of extra temporaries (materialised per-sample gradients are
    memory-bound: on a 2-core CPU ``direct`` measured 1.8x a plain step where FLOPs alone
    predicted it cheapest; see ``drpost bench``)."""
    if multi_use or rule.supports == ("reduced_ghost",):
        return "reduced_ghost"
    if requested != "auto":
        return requested
    best, best_cost = "reduced_ghost", None
    for name in EXACT:
        if name == "pairwise_ghost" and not target_factors_available:
            continue
        flops, extra = rule.cost(name, b, v, s, k)
        if extra > max_bytes:
            continue
        cost = flops + BYTE_COST * extra
        if best_cost is None or cost < best_cost:
            best, best_cost = name, cost
    return best


__all__ = ["BACKENDS", "EXACT", "check_backend", "choose_backend", "LayerSketch", "parse_sketch"]
