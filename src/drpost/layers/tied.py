"""Ghost scores for a parameter shared by a projection and lookups (tied input/output embeddings).

The per-sample gradient of the shared matrix W [Vocab, D] is the sum of both uses,
G_i = (delta^L_i)^T x^L_i + sum_s e_{id_is} (delta^E_is)^T, and so is the target's. The score
<G_i, G_T> therefore has four terms; each is computed from the factors alone, never forming a
[Vocab, D] matrix:
  Linear x Linear       the Linear rule's pairwise ghost
  Embedding x Embedding sum_{s,t} [id_is == id_t] delta^E_is . delta^E_t
  Linear x Embedding    sum_{s,t} delta^L_is[id_t] (x^L_is . delta^E_t)
  Embedding x Linear    sum_{s,t} delta^L_t[id_is] (delta^E_is . x^L_t)
(t runs over all target positions). ``rows=True`` gives the same per vocabulary row.

Rules take part by what they declare, not by their class: ``tied_form`` is "projection" (the
Linear role above: factors x [N, S, D], delta [N, S, Vocab]) or "lookup" (the Embedding role:
ids [N, S], delta [N, S, D]); see layers/base.py. A group with any other rule is not ghostable
and is scored through its collapsed dense target instead.
"""
from __future__ import annotations

import torch

from .base import TIED_LOOKUP, TIED_PROJECTION, Factors, acc_dtype
from .embedding import scatter_rows


def ghostable(rules) -> bool:
    """At most one projection ([Vocab, D] weight, no trainable bias) and at least one lookup."""
    forms = [getattr(r, "tied_form", None) for r in rules]
    return (all(f in (TIED_PROJECTION, TIED_LOOKUP) for f in forms)
            and forms.count(TIED_PROJECTION) <= 1 and forms.count(TIED_LOOKUP) >= 1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() > 2 else t.reshape(-1)


def cross_scores(rule_g, gen: Factors, rule_t, tgt: Factors, rows: bool) -> torch.Tensor:
    dt = acc_dtype(gen.d)
    lin_g, lin_t = rule_g.tied_form == TIED_PROJECTION, rule_t.tied_form == TIED_PROJECTION
    b, s = gen.d.shape[:2]
    vocab = rule_g.num_rows()
    if lin_g and lin_t:
        return rule_g.pairwise_scores(gen, tgt, rows)
    if not lin_g and not lin_t:                        # embedding x embedding
        ids_t, d_t = _flat(tgt.a), _flat(tgt.d)
        eq = (gen.a[:, :, None] == ids_t[None, None, :])
        val = ((gen.d.reshape(b * s, -1) @ d_t.t()).view(b, s, -1) * eq).sum(-1, dtype=dt)   # [B, S]
        return scatter_rows(val, gen.a, vocab) if rows else val.sum(1)
    if lin_g:                                          # general Linear use, target Embedding use
        ids_t, d_t = _flat(tgt.a), _flat(tgt.d)         # [P], [P, D]
        a = (gen.a.reshape(b * s, -1) @ d_t.t()).view(b, s, -1)         # x^L_is . delta^E_t
        g = gen.d.index_select(2, ids_t)                                 # delta^L_is[id_t]
        val = (a * g).sum(1, dtype=dt)                                   # [B, P]
        if rows:
            out = val.new_zeros(b, vocab)
            return out.index_add_(1, ids_t, val)
        return val.sum(1)
    # general Embedding use, target Linear use
    x_t, d_t = _flat(tgt.a), _flat(tgt.d)               # [P, D], [P, Vocab]
    a = (gen.d.reshape(b * s, -1) @ x_t.t()).view(b, s, -1)             # delta^E_is . x^L_t
    g = d_t.index_select(1, gen.a.reshape(-1)).t().reshape(b, s, -1)   # delta^L_t[id_is]
    val = (a * g).sum(-1, dtype=dt)                                      # [B, S]
    return scatter_rows(val, gen.a, vocab) if rows else val.sum(1)


def factors_fit(rules, v: int, s: int) -> bool:
    """Do V target rows of S tokens take no more memory as the tied weight's factors (the projection's
    input and output gradient, V S (D + Vocab), plus each lookup's output gradient, V S D) than as the
    dense [Vocab, D] target? (The separate strategy then caches them, as for a Linear.)"""
    lin = next((r for r in rules if r.tied_form == TIED_PROJECTION), None)
    if lin is None:
        return False
    o, i = lin.factor_dims()
    lookups = sum(1 for r in rules if r.tied_form == TIED_LOOKUP)
    return v * s * (o + i + lookups * i) <= o * i


def cost(rules, b: int, v: int, s: int) -> tuple[float, float]:
    """FLOPs of the four ghost terms vs collapsing the target into a dense [Vocab, D] matrix."""
    lin = next((r for r in rules if r.tied_form == TIED_PROJECTION), None)
    if lin is None:     # lookups only: the dense target is one scatter-add, never worse
        return float("inf"), 0.0
    o, i = lin.factor_dims()
    ghost = 2.0 * b * v * s * s * (o + 3 * i)
    dense = 2.0 * (b + v) * s * o * i
    return ghost, dense
