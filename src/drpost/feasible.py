"""Feasible sets as pure selection policies.

Every function here maps a score tensor (and, for ``greedy``, a Gram matrix) to a boolean mask
of chosen general samples. Scores have the general samples along dim 0: shape ``[B]`` for a
layer-level (or global) decision, ``[B, R]`` for row-level decisions (``rowwise``), where every
column picks its own subset. Nothing here knows about models, hooks or devices, and nothing
forces a host synchronisation.

Ties are broken deterministically: among equal scores the lower sample index is preferred by
``topk_mask`` and dropped first by ``filter_mask``.
"""
from __future__ import annotations

import math

import torch

FEASIBLE_SETS = ("standard", "target_only", "global", "layerwise", "filter", "greedy", "rowwise", "random")
SCOPES = ("layer", "global")


def num_selected(batch_size: int, frac: float) -> int:
    """k = max(1, floor(B * frac)), the size of a top-k feasible set."""
    check_frac(frac)
    return max(1, min(batch_size, math.floor(batch_size * frac)))


def check_frac(frac: float) -> None:
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (0.0 < float(frac) <= 1.0):
        raise ValueError(
            f"frac (the regularization strength) must be a number in (0, 1], got {frac!r}: "
            "frac=1 keeps every general sample (plain training), smaller values keep fewer.")


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    # stable sort of -scores: equal scores keep their index order, so lower indices come first
    return torch.sort(-scores, dim=0, stable=True).indices


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest scores along dim 0 (per column for 2-D scores)."""
    b = scores.shape[0]
    if not 1 <= k <= b:
        raise ValueError(f"k must be in [1, {b}], got {k}")
    order = _descending_order(scores)[:k]
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(0, order, True)
    return mask


def filter_mask(scores: torch.Tensor, frac: float) -> torch.Tensor:
    """Keep every sample with a non-negative score; of the n_neg negative ones drop the
    floor(n_neg * frac) most negative. frac=1 drops all negatives, frac=0 keeps everything.
    The result may be empty."""
    if not 0.0 <= float(frac) <= 1.0:
        raise ValueError(f"filter frac must be in [0, 1], got {frac!r}")
    negative = scores < 0
    n_drop = torch.floor(negative.sum(0).to(torch.float64) * float(frac)).to(torch.long)
    ascending = torch.sort(scores, dim=0, stable=True).indices
    rank = torch.empty_like(ascending)
    rank.scatter_(0, ascending, torch.arange(scores.shape[0], device=scores.device)
                  .view(-1, *([1] * (scores.dim() - 1))).expand_as(ascending))
    return ~(negative & (rank < n_drop))


def random_mask(shape, k: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """k samples drawn uniformly without replacement along dim 0, independently per column."""
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    keys = torch.rand(shape, generator=generator, device=device or "cpu")
    mask = topk_mask(keys, k)
    return mask.to(device) if device is not None else mask


def greedy_mask(scores: torch.Tensor, gram: torch.Tensor, k: int, lr: float) -> torch.Tensor:
    """Second-order greedy selection (GREATS-style): repeatedly take the best marginal gain
    u_j, then penalise the others by lr * <G_j, G_i> (the train-train Gram matrix)."""
    if scores.dim() != 1 or gram.shape != (scores.shape[0], scores.shape[0]):
        raise ValueError("greedy_mask needs scores [B] and a Gram matrix [B, B]")
    b = scores.shape[0]
    if not 1 <= k <= b:
        raise ValueError(f"k must be in [1, {b}], got {k}")
    u = scores.to(torch.float64).clone()
    g = gram.to(torch.float64)
    mask = torch.zeros(b, dtype=torch.bool, device=scores.device)
    for _ in range(k):
        j = torch.argmax(u)  # first maximal index on ties
        mask[j] = True
        u = u - lr * g[j]
        u[mask] = -math.inf
    return mask


def all_mask(shape, device=None) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool, device=device)


def normalise_scores(scores: torch.Tensor, how: str, tokens: torch.Tensor | None = None,
                     sample_norms: torch.Tensor | None = None,
                     target_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Optional score normalisation before selection (a design axis the paper leaves open).
    ``per_token``: s_i / T_i. ``cosine``: s_i / (|G_i| |g_T|). Zero denominators give 0."""
    if how == "none":
        return scores
    if how == "per_token":
        t = tokens.to(scores.dtype).view(-1, *([1] * (scores.dim() - 1)))
        return torch.where(t > 0, scores / t.clamp_min(1), torch.zeros_like(scores))
    if how == "cosine":
        denom = sample_norms.to(scores.dtype) * target_norm.to(scores.dtype)
        return torch.where(denom > 0, scores / torch.where(denom > 0, denom, torch.ones_like(denom)),
                           torch.zeros_like(scores))
    raise ValueError(f"unknown score_norm {how!r}; choose one of none, per_token, cosine")
