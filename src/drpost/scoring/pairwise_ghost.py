"""pairwise_ghost: keep the target's factors and score from factor inner products alone, for a
linear map s_i = sum_v sum_{s,t} (delta_is . delta_vt)(x_is . x_vt). A parameter shared by a
projection and lookups (tied embeddings) is scored by the four cross terms of layers/tied.py.
The cached form is a list of (rule, target factors); chunks are concatenated (METHOD §9.11)."""
from __future__ import annotations

from ..layers import Factors, tied
from .base import ScoringBackend, dense_target, index_of
from .reduced_ghost import dense_sq_norm


class PairwiseGhost(ScoringBackend):
    name = "pairwise_ghost"
    cache_kind = "pairwise_ghost"

    def target(self, group, cfg, parts, rows):
        rules = list({id(r): r for r, _, _ in parts}.values())
        cat = [(rule, Factors.cat([t for r, _, t in parts if r is rule])) for rule in rules]
        return [(rule, Factors(f.a.detach(), f.d.detach(), f.support)) for rule, f in cat]   # a cache keeps no graph

    def extend(self, old, new):
        have = {id(r): f for r, f in old}
        return [(r, Factors.cat([have[id(r)], f]) if id(r) in have else f) for r, f in new]

    def save(self, group, rep):
        return [(index_of(group.rules, r), f.a, f.d) for r, f in rep]

    def load(self, group, rep):
        return [(group.rules[i], Factors(a, d)) for i, a, d in rep]

    def scores(self, group, cfg, parts, target, rows):
        if not group.multi_use:
            return super().scores(group, cfg, parts, target, rows)
        raw = None
        for rule, gen, _ in parts:
            for rule_t, tgt in target:
                sc = tied.cross_scores(rule, gen, rule_t, tgt, rows)
                raw = sc if raw is None else raw + sc
        return raw, None

    def part_scores(self, group, cfg, rule, gen, target, rows):
        return rule.pairwise_scores(gen, {id(r): f for r, f in target}[id(rule)], rows)

    def target_sq_norm(self, group, cfg, target, rows):
        if rows or group.multi_use:
            return dense_sq_norm(group, dense_target(target), rows)
        rule, tf = target[0]
        return rule.gram(tf).sum()
