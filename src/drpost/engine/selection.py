"""Selection dispatch: which pure policy of :mod:`drpost.feasible` each feasible set applies.

One table, :data:`SELECTIONS`, maps every selecting feasible set to its policy and its two
properties the pipeline needs: whether it keeps a fixed number k of samples (then the chosen
rows are gathered without a host sync, and k == B means "every sample") and whether it needs the
train-train Gram matrix. ``standard`` and ``target_only`` select nothing (plain autograd).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import feasible as fs


@dataclass(frozen=True)
class Selection:
    policy: Callable      # (scores, gram, k, options, generator, tokens) -> bool mask
    fixed_size: bool      # keeps exactly k = num_selected(B, frac) samples per decision
    needs_gram: bool = False


def _topk(scores, gram, k, options, generator, tokens):
    return fs.topk_mask(scores, k)


def _filter(scores, gram, k, options, generator, tokens):
    return fs.filter_mask(scores, options.frac)


def _greedy(scores, gram, k, options, generator, tokens):
    return fs.greedy_mask(scores, gram, k, options.greedy_lr, tokens=tokens)


def _random(scores, gram, k, options, generator, tokens):
    return fs.random_mask(scores.shape, k, generator).to(scores.device)


SELECTIONS: dict[str, Selection] = {
    "layerwise": Selection(_topk, fixed_size=True),
    "global": Selection(_topk, fixed_size=True),
    "rowwise": Selection(_topk, fixed_size=False),    # one top-k per output row: the mask is [B, R]
    "filter": Selection(_filter, fixed_size=False),
    "greedy": Selection(_greedy, fixed_size=True, needs_gram=True),
    "random": Selection(_random, fixed_size=True),
}
assert set(SELECTIONS) == set(fs.FEASIBLE_SETS) - {"standard", "target_only"}


def select(options, scores: torch.Tensor, gram, generator: torch.Generator, tokens, warn) -> torch.Tensor:
    """The feasible set's mask over the samples of ``scores`` (dim 0)."""
    b = scores.shape[0]
    k = fs.num_selected(b, options.frac)
    sel = SELECTIONS[options.feasible_set]
    if sel.fixed_size or options.feasible_set == "rowwise":
        if k == b and options.frac < 1:
            warn(f"drpost: feasible_set={options.feasible_set!r} with frac={options.frac:g} keeps k = {k} of "
                 f"{b} samples, i.e. every sample: the batch that selects is too small for this frac (with one "
                 "row per micro-batch every feasible set is plain training); raise the (per-process) batch "
                 "size or lower frac")
    return sel.policy(scores, gram, k, options, generator, tokens)


def fixed_k(options, mask: torch.Tensor) -> int | None:
    """The number of chosen samples when it is known without looking at the mask (None when
    unknown, or when every sample is chosen)."""
    if mask.dim() != 1 or not SELECTIONS[options.feasible_set].fixed_size:
        return None
    k = fs.num_selected(mask.shape[0], options.frac)
    return None if k == mask.shape[0] else k


def keeps_all(options, mask: torch.Tensor) -> bool:
    """A fixed-size set whose k is the whole (gathered) batch: every sample, weight 1."""
    return mask.dim() == 1 and SELECTIONS[options.feasible_set].fixed_size and \
        fs.num_selected(mask.shape[0], options.frac) == mask.shape[0]
