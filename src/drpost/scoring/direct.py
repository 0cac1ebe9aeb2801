"""direct: materialise the per-sample gradients G_i (in chunks that fit ``direct_max_bytes``) and
dot them with the dense target gradient; when they fit at once they are handed back so that the
chosen update reuses them. Rows-level scores use the rule's factor formula."""
from __future__ import annotations

import torch

from .reduced_ghost import ReducedGhost


def _dot(per_sample: dict, dense: dict) -> torch.Tensor:
    return sum((g.flatten(1) * dense[p].flatten().to(g.dtype)).sum(1) for p, g in per_sample.items() if p in dense)


class Direct(ReducedGhost):
    name = "direct"

    def scores(self, group, cfg, parts, target, rows):
        if len(parts) != 1:
            return super().scores(group, cfg, parts, target, rows)
        rule, gen, _ = parts[0]
        nbytes = 4.0 * gen.n * sum(p.numel() for p in rule.params)
        if rows:
            return rule.dense_scores(gen, target, rows), None
        if nbytes <= cfg.direct_max_bytes:
            per_sample = rule.per_sample(gen)
            return _dot(per_sample, target), per_sample
        chunk = max(1, int(cfg.direct_max_bytes // max(nbytes / gen.n, 1)))
        return torch.cat([_dot(rule.per_sample(gen.rows(slice(i, i + chunk))), target)
                          for i in range(0, gen.n, chunk)]), None
