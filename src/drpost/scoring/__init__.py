"""Scoring back-ends: how the score s_i = <G_i, g_T> of each general sample is computed for a layer.

One interface (scoring/base.py), several costs (METHOD §2), one module each:
  reduced_ghost  collapse the target into its dense gradient G_T, then s_i = sum_s delta_s . (G_T x_s)
  pairwise_ghost keep the target factors; s_i = sum_v sum_{s,t} (delta_is . delta_vt)(x_is . x_vt)
  direct         materialise G_i [B, O, I] (chunked to a memory bound) and dot with G_T; the
                 materialised gradients are reused to build the chosen update
  sketch         factorised random projection of both factors (approximate, unbiased)
  auto           per layer, the cheapest exact back-end for the shapes at hand (scoring/auto.py)
Layer-type specifics live in the layer rules (drpost.layers); a back-end only calls them.
"""
from __future__ import annotations

from .auto import BYTE_COST, EXACT, choose_backend, choose_for_group
from .base import ScoringBackend, ScoringConfig, add_into
from .direct import Direct
from .pairwise_ghost import PairwiseGhost
from .reduced_ghost import ReducedGhost
from .sketch import LayerSketch, Sketch, parse_sketch

BACKENDS = ("reduced_ghost", "pairwise_ghost", "direct", "sketch", "auto")

#: name -> back-end object ("auto" is not one: it resolves to one of these per layer and step)
BACKEND_TABLE: dict[str, ScoringBackend] = {b.name: b for b in (ReducedGhost(), PairwiseGhost(), Direct(), Sketch())}

#: cache kind -> the back-end that scores against a cached target of that kind
CACHE_READERS: dict[str, ScoringBackend] = {"dense": BACKEND_TABLE["reduced_ghost"],
                                            "pairwise_ghost": BACKEND_TABLE["pairwise_ghost"],
                                            "sketch": BACKEND_TABLE["sketch"]}


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown scoring back-end {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def cache_reader(kind: str) -> ScoringBackend:
    if kind not in CACHE_READERS:
        raise ValueError(f"unknown cached target kind {kind!r} (expected one of {', '.join(CACHE_READERS)}): "
                         "the checkpoint was not written by this version of drpost")
    return CACHE_READERS[kind]


__all__ = ["BACKENDS", "BACKEND_TABLE", "BYTE_COST", "CACHE_READERS", "EXACT", "ScoringBackend", "ScoringConfig",
           "add_into", "cache_reader", "check_backend", "choose_backend", "choose_for_group", "LayerSketch",
           "parse_sketch"]
