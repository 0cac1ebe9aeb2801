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

import functools
import math
from fractions import Fraction

import torch

FEASIBLE_SETS = ("standard", "target_only", "global", "layerwise", "filter", "greedy", "rowwise", "random")
SCOPES = ("layer", "global")


@functools.lru_cache(maxsize=64)
def frac_fraction(frac) -> Fraction:
    """The fraction the user wrote: float frac read back as the simplest rational it stands for.

    A float like 0.29 is stored as 0.28999999999999998; the nearest fraction with a denominator
    of at most 10**6 that rounds to the same float (29/100 here; 1/3 for 1/3) is taken, which
    covers every decimal with up to six places and every n/m with m <= 10**6; any other float is
    read as its shortest decimal repr. Cached: it is asked per layer per step."""
    exact = Fraction(frac)
    simple = exact.limit_denominator(10 ** 6)
    if float(simple) == float(frac):
        return simple
    return Fraction(repr(float(frac)))


def num_selected(batch_size: int, frac: float) -> int:
    """k = max(1, floor(B * frac)) in exact rational arithmetic (frac read by
    :func:`frac_fraction`, so B = 100, frac = 0.29 gives 29), clipped to B. No range check:
    :class:`drpost.engine.options.DrPostOptions` checks frac once."""
    f = frac_fraction(frac)
    return max(1, min(batch_size, batch_size * f.numerator // f.denominator))


def check_frac(frac: float) -> None:
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (0.0 < float(frac) <= 1.0):
        raise ValueError(
            f"frac (the regularization strength) must be a number in (0, 1], got {frac!r}: "
            "frac=1 keeps every general sample (plain training), smaller values keep fewer.")


def _integer_ratio(frac, batch_size: int) -> tuple[int, int]:
    """(numerator, denominator) of frac, small enough that batch_size * numerator fits int64."""
    f = frac_fraction(frac)
    if batch_size * f.denominator >= 2 ** 62:    # only a float with ~17 significant digits gets here
        f = f.limit_denominator(2 ** 62 // max(batch_size, 1))
    return f.numerator, f.denominator


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
    floor(n_neg * frac) most negative (exactly: frac read by :func:`frac_fraction`).
    frac=1 drops all negatives, frac=0 keeps everything. The result may be empty."""
    if not 0.0 <= float(frac) <= 1.0:
        raise ValueError(f"filter frac must be in [0, 1], got {frac!r}")
    negative = scores < 0
    num, den = _integer_ratio(frac, scores.shape[0])
    n_drop = negative.sum(0) * num // den     # floor(n_neg * frac) in exact integer arithmetic, on device
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


def greedy_mask(scores: torch.Tensor, gram: torch.Tensor, k: int, lr: float,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Second-order greedy selection (GREATS-style) of k general samples.

    ``scores[i]`` = s_i = <G_i, g_T> and ``gram[i, j]`` = K_ij = <G_i, G_j>, where G_i is sample
    i's token-*sum* gradient (its T_i = ``tokens[i]`` supervised tokens) and g_T the token-*mean*
    target gradient (the engine's scores with score_norm='none'; summed over layers for a global
    decision). drpost's update for a set S is the token mean of the chosen samples,
    Delta_S = sum_{i in S} G_i / T_S with T_S = sum_{i in S} T_i (METHOD 1.6). The objective is the
    second-order Taylor gain of one SGD step of size eta = ``lr`` along it, with the target
    Hessian replaced by the identity (as GREATS and the reference do):

        gain(S) = L_T(theta) - L_T(theta - eta Delta_S)
               ~= eta <Delta_S, g_T> - eta^2/2 |Delta_S|^2
                = eta (sum_S s_i) / T_S - eta^2/2 (sum_{i,j in S} K_ij) / T_S^2   (0 when T_S = 0).

    Greedy: from S = {} add, k times, the sample j not in S with the largest gain(S + {j}) (ties:
    the lower index). Both terms are on the token-mean scale: multiplying every sequence length
    by c (G_i, s_i by c, K by c^2, T_i by c) leaves the choice unchanged, so eta is a step size
    on the update drpost applies, whatever the sequence lengths. As eta -> 0 the choice maximises
    the first-order gain of that update (the token-weighted mean of s_i / T_i), which is not
    top-k of the token-sum scores s_i. With gradient accumulation each micro-batch is chosen on
    its own T_S.

    ``tokens=None`` keeps the reference's objective on raw scales (METHOD 1.5): u_i = s_i, then
    u <- u - lr * K[j] after each pick j, i.e. eta sum_S s_i - eta^2 sum_{i<j in S} K_ij with
    the token-mean s and the token-sum K, so there lr's meaning changes with sequence length.

    No host synchronisation (k device argmaxes)."""
    if scores.dim() != 1 or gram.shape != (scores.shape[0], scores.shape[0]):
        raise ValueError("greedy_mask needs scores [B] and a Gram matrix [B, B]")
    b = scores.shape[0]
    if not 1 <= k <= b:
        raise ValueError(f"k must be in [1, {b}], got {k}")
    if tokens is not None and tokens.shape != scores.shape:
        raise ValueError(f"greedy_mask needs tokens [B] = [{b}], got {tuple(tokens.shape)}")
    s, g = scores.to(torch.float64), gram.to(torch.float64)
    index = torch.arange(b, device=scores.device)
    mask = torch.zeros(b, dtype=torch.bool, device=scores.device)
    if tokens is None:
        u = s.clone()
        for _ in range(k):
            j = torch.argmax(u).view(1)  # first maximal index on ties
            mask |= index == j
            u = (u - lr * g.index_select(0, j)[0]).masked_fill(mask, -math.inf)
        return mask
    t = tokens.to(device=scores.device, dtype=torch.float64)
    diag = g.diagonal()
    chosen_s = chosen_t = chosen_q = s.new_zeros(())   # sum_S s_i, T_S, sum_{i,j in S} K_ij
    cross = torch.zeros_like(s)                         # sum_{i in S} K_ij for every j
    for _ in range(k):
        cand_s, cand_t, cand_q = chosen_s + s, chosen_t + t, chosen_q + 2 * cross + diag
        safe_t = torch.where(cand_t > 0, cand_t, torch.ones_like(cand_t))
        gain = torch.where(cand_t > 0, cand_s / safe_t - 0.5 * lr * cand_q / safe_t ** 2, torch.zeros_like(s))
        j = torch.argmax(gain.masked_fill(mask, -math.inf)).view(1)   # gain / eta; ties: lower index
        mask |= index == j
        chosen_s, chosen_t, chosen_q = cand_s[j][0], cand_t[j][0], cand_q[j][0]
        cross = cross + g.index_select(0, j)[0]
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
