"""The IIF baseline (the reference code's RLHF baseline, after LDA-ORL's influence filtering):
score every completion of the rollout ONCE, before the update epochs, with the global score
sum_l <G_i^l, g_T^l> against the target gradient, drop the negatively scored ones (``frac`` of
them; 1 = all), and run the plain update on the rest for every epoch and mini-batch.

Unlike drpost's per-micro-batch feasible sets the subset is fixed for the whole rollout and one
decision covers every layer. Statistics of an IIF step (reward, KL, ...) are computed over the
whole rollout like every other method's, not over the kept subset (METHOD §9.7).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from drpost import feasible as fs
from drpost.engine import DataRegularizer


def iif_keep(scorer: DataRegularizer, rows: dict, micro_batch: int, frac: float, params, autocast=None) -> torch.Tensor:
    """Boolean mask of the kept completions. ``scorer`` is a ``filter``/global-scope regularizer whose
    target gradient is already captured; its scoring backward passes write ``.grad`` of ``params``,
    which is discarded. Scores are per completion, so chunking the rollout into micro-batches
    does not change them."""
    if scorer.feasible_set != "filter" or scorer.scope != "global":
        raise ValueError("the IIF scorer must use feasible_set='filter' with scope='global'")
    n = rows["input_ids"].shape[0]
    scores = []
    for s in range(0, n, micro_batch):
        chunk = {k: v[s:s + micro_batch] for k, v in rows.items()}
        with (autocast() if autocast is not None else nullcontext()):
            scorer.backward(chunk)
        scores.append(scorer.last_global_scores.detach().to(torch.float64))
        for p in params:
            p.grad = None
    return fs.filter_mask(torch.cat(scores), frac)
