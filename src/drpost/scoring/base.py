"""The interface every scoring back-end implements, and the helpers they share.

A back-end object is stateless; what it works on is passed in: the layer ``group`` (its rules,
whether its parameter is used by several calls, its sketches, its parameter layout through
``group.row_sum``), the :class:`ScoringConfig`, and ``parts``: one ``(rule, general factors,
target factors)`` triple per backward call of the group in this pass.

The target representation a back-end builds (``target``) is what the separate strategy caches;
its ``cache_kind`` names that form ("dense": {param: raw target gradient}; back-ends that share a
form share a cache), ``extend`` adds another target chunk to it, ``save``/``load`` turn it into
the checkpoint format (indices instead of parameter and rule objects) and back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers.base import add_into  # noqa: F401  (re-exported: drpost.scoring.add_into)


@dataclass
class ScoringConfig:
    scoring: str
    sketch_kind: str
    sketch_k1: int
    sketch_k2: int
    seed: int
    direct_max_bytes: float
    score_norm: str
    target_factors: bool    # may the target side be kept as factors (pairwise ghost)?
    calibrate: bool = False  # auto: time the candidate back-ends per layer shape (scoring/calibration.py)
    factor_cache: bool = False  # separate + auto (a Linear, a tied weight) or sketch (a tied weight): cache the
    #                             target as factors where they are no larger


def dense_target(pairs) -> dict:
    """{param: raw target gradient} (float32 or wider) from (rule, target factors) pairs."""
    dense: dict = {}
    for rule, t in pairs:
        for p, g in rule.target_dense(t).items():
            add_into(dense, p, g, torch.promote_types(g.dtype, torch.float32))
    return dense


def per_sample_sum(parts) -> dict:
    """{param: [B, *param.shape]} per-sample gradients summed over the calls of a shared parameter."""
    ps: dict = {}
    for rule, gen, _ in parts:
        for p, g in rule.per_sample(gen).items():
            add_into(ps, p, g)
    return ps


def index_of(items, obj) -> int:
    """Position of ``obj`` in ``items`` by identity (parameters compare elementwise with ==)."""
    return next(i for i, x in enumerate(items) if x is obj)


class ScoringBackend:
    name = "?"
    cache_kind = "dense"

    # -- target side ------------------------------------------------------------------------
    def target(self, group, cfg: ScoringConfig, parts, rows: bool):
        """The target rows in the form this back-end scores against (raw sums over target rows)."""
        raise NotImplementedError

    def extend(self, old, new):
        """Add a target chunk's representation to a cached one (dict forms: summed per key)."""
        for key, val in new.items():
            old[key] = old[key] + val if key in old else val
        return old

    def save(self, group, rep):
        return {index_of(group.params, p): v for p, v in rep.items()}

    def load(self, group, rep):
        return {group.params[i]: v for i, v in rep.items()}

    # -- scores -------------------------------------------------------------------------------
    def scores(self, group, cfg: ScoringConfig, parts, target, rows: bool):
        """(raw scores <G_i, sum of target rows' gradients> [B] or [B, R], per-sample gradients
        materialised on the way or None)."""
        raw = None
        for rule, gen, _ in parts:
            sc = self.part_scores(group, cfg, rule, gen, target, rows)
            raw = sc if raw is None else raw + sc
        return raw, None

    def part_scores(self, group, cfg: ScoringConfig, rule, gen, target, rows: bool) -> torch.Tensor:
        raise NotImplementedError

    # -- norms (score_norm="cosine") ----------------------------------------------------------
    def sample_sq_norms(self, group, cfg: ScoringConfig, parts, rows: bool) -> torch.Tensor:
        """|G_i|^2 [B] (or per row [B, R]); a shared parameter sums its calls' gradients first."""
        if group.multi_use:
            return sum(group.row_sum(p, g.pow(2), rows) for p, g in per_sample_sum(parts).items())
        rule, gen, _ = parts[0]
        return self.one_sq_norms(group, cfg, rule, gen, rows)

    def one_sq_norms(self, group, cfg: ScoringConfig, rule, gen, rows: bool) -> torch.Tensor:
        return rule.sq_norms(gen, rows)

    def target_sq_norm(self, group, cfg: ScoringConfig, target, rows: bool) -> torch.Tensor:
        """|sum of target rows' gradients|^2 (scalar, or per row [R])."""
        raise NotImplementedError

    # -- Gram matrix (feasible_set="greedy") --------------------------------------------------
    def gram(self, group, cfg: ScoringConfig, parts) -> torch.Tensor:
        """<G_i, G_j> [B, B]."""
        if group.multi_use:
            flat = torch.cat([g.flatten(1) for g in per_sample_sum(parts).values()], 1)
            return flat @ flat.t()
        rule, gen, _ = parts[0]
        return self.one_gram(group, cfg, rule, gen)

    def one_gram(self, group, cfg: ScoringConfig, rule, gen) -> torch.Tensor:
        return rule.gram(gen)
