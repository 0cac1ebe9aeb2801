"""nn.Embedding: per-sample gradient G_i = sum_s e_{id_{i,s}} delta_{i,s}^T (a scatter of rows).

Scores are exact gather-dots against the target's scatter-added gradient, whatever back-end is
asked for (a [Vocab, D] per-sample gradient is never materialised, except on request for Gram
matrices of tied weights). Positions holding ``padding_idx`` contribute nothing, on the general
and on the target side alike (METHOD §9.15).
"""
from __future__ import annotations

import torch

from .base import TIED_LOOKUP, Factors, LayerRule, acc_dtype
from .registry import register_rule


def scatter_rows(per_token: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-token values [B, S] summed into their token's vocabulary row: [B, Vocab]."""
    b = ids.shape[0]
    flat = (torch.arange(b, device=ids.device)[:, None] * vocab + ids).reshape(-1)
    out = per_token.new_zeros(b * vocab)
    out.index_add_(0, flat, per_token.reshape(-1))
    return out.view(b, vocab)


@register_rule(torch.nn.Embedding)
class EmbeddingRule(LayerRule):
    kind = "embedding"
    supports = ("reduced_ghost",)
    broadcast_input_ok = True       # position embeddings indexed by [1, T] ids
    tied_form = TIED_LOOKUP

    def __init__(self, module: torch.nn.Embedding):
        super().__init__(module)
        if getattr(module, "max_norm", None) is not None:
            raise ValueError("nn.Embedding with max_norm (renormalises weights in forward) is not supported; "
                             "freeze it or remove max_norm")
        if getattr(module, "sparse", False):
            raise ValueError("sparse nn.Embedding gradients are not supported; use sparse=False")
        self.weight = module.weight
        self.vocab, self.dim = module.weight.shape

    def input_grad(self, ids, d):
        return None

    def factors(self, ids, d):
        ids = ids.reshape(ids.shape[0], -1)
        d = d.reshape(ids.shape[0], ids.shape[1], -1)
        pad = self.module.padding_idx
        if pad is not None:
            d = d.masked_fill((ids == pad)[..., None], 0)
        return Factors(ids, d)

    def num_rows(self):
        return self.vocab

    def cost(self, backend, b, v, s, k):
        return 2.0 * (b + v + k) * s * self.dim, 4.0 * b * s * self.dim

    def target_dense(self, f):
        dt = acc_dtype(f.d)
        g = torch.zeros(self.vocab, self.dim, dtype=dt, device=f.d.device)
        g.index_add_(0, f.a.reshape(-1), f.d.reshape(-1, self.dim).to(dt))
        return {self.weight: g}

    def _token_scores(self, f, g):
        return (g.to(f.d.dtype)[f.a] * f.d).sum(-1, dtype=acc_dtype(f.d))     # [B, S]

    def _scatter_rows(self, f, per_token):
        return scatter_rows(per_token, f.a, self.vocab)

    def dense_scores(self, f, dense, rows):
        g = dense.get(self.weight)
        if g is None:
            return f.d.new_zeros((f.n, self.vocab) if rows else (f.n,), dtype=acc_dtype(f.d))
        tok = self._token_scores(f, g)
        return self._scatter_rows(f, tok) if rows else tok.sum(1)

    def pairwise_scores(self, f, t, rows):
        return self.dense_scores(f, self.target_dense(t), rows)

    def per_sample(self, f):
        dt = acc_dtype(f.d)
        b = f.n
        flat = (torch.arange(b, device=f.a.device)[:, None] * self.vocab + f.a).reshape(-1)
        g = torch.zeros(b * self.vocab, self.dim, dtype=dt, device=f.d.device)
        g.index_add_(0, flat, f.d.reshape(-1, self.dim).to(dt))
        return {self.weight: g.view(b, self.vocab, self.dim)}

    def sketch(self, f, proj, rows):
        raise NotImplementedError("embeddings are always scored exactly")

    def _same_token_dots(self, f):
        """q_{i,s} = sum_t [id_s == id_t] delta_s . delta_t, per sample [B, S]."""
        dt = acc_dtype(f.d)
        eq = (f.a[:, :, None] == f.a[:, None, :]).to(dt)
        dd = (f.d @ f.d.transpose(1, 2)).to(dt)
        return (dd * eq).sum(2)

    def sq_norms(self, f, rows):
        q = self._same_token_dots(f)
        return self._scatter_rows(f, q) if rows else q.sum(1)

    def gram(self, f):
        dt = acc_dtype(f.d)
        eq = (f.a[:, None, :, None] == f.a[None, :, None, :]).to(dt)         # [B, B, S, S]
        dd = torch.einsum("isd,jtd->ijst", f.d, f.d).to(dt)
        return (dd * eq).sum((2, 3))

    def chosen_into(self, acc, f, w, idx=None):
        """Scatter-added straight into an accumulator that already holds this weight's gradient
        (a tied lm_head's, added first): no second [Vocab, D] tensor is zeroed and added."""
        g = acc.get(self.weight)
        if g is None or g.dtype != acc_dtype(f.d):
            return super().chosen_into(acc, f, w, idx)
        if idx is not None:
            f, w = Factors(f.a.index_select(0, idx), f.d.index_select(0, idx)), None
        g.index_add_(0, f.a.reshape(-1), self._weighted_rows(f, w).to(g.dtype))

    def _weighted_rows(self, f, w):
        """delta of every position times its weight, [B * S, D]."""
        if w is None:
            return f.d.reshape(-1, self.dim)
        tw = torch.gather(w, 1, f.a) if w.dim() == 2 else w[:, None].expand_as(f.a)   # per vocab row / per sample
        return (f.d * tw[..., None].to(f.d.dtype)).reshape(-1, self.dim)

    def chosen(self, f, w):
        g = torch.zeros(self.vocab, self.dim, dtype=acc_dtype(f.d), device=f.d.device)
        g.index_add_(0, f.a.reshape(-1), self._weighted_rows(f, w).to(g.dtype))
        return {self.weight: g}
