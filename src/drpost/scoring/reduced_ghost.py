"""reduced_ghost: collapse the target into its dense gradient G_T, then score every sample
against it from its factors (for a linear map s_i = sum_s delta_s . (G_T x_s)). Every rule
supports it, and a parameter shared by several calls is scored this way by default."""
from __future__ import annotations

import torch

from .base import ScoringBackend, dense_target


def dense_sq_norm(group, target: dict, rows: bool) -> torch.Tensor:
    return sum(group.row_sum(p, g.pow(2)[None], rows)[0] for p, g in target.items())


class ReducedGhost(ScoringBackend):
    name = "reduced_ghost"
    cache_kind = "dense"

    def target(self, group, cfg, parts, rows):
        return dense_target((rule, t) for rule, _, t in parts)

    def part_scores(self, group, cfg, rule, gen, target, rows):
        return rule.dense_scores(gen, target, rows)

    def target_sq_norm(self, group, cfg, target, rows):
        return dense_sq_norm(group, target, rows)
