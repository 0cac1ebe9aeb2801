"""nn.Linear (weight [O, I]) and Hugging Face GPT-2 Conv1D (weight [I, O]), with or without bias.

Per-sample gradient of one call: G_i = sum_s delta_{i,s} x_{i,s}^T (+ bias part sum_s delta_{i,s}).
Every score below is an inner product with G_i computed from x and delta alone (the ghost
trick), or from G_i materialised (``per_sample``) when that is cheaper.
"""
from __future__ import annotations

import torch

from .base import TIED_PROJECTION, Factors, LayerRule, acc_dtype, add_into, row_runs
from .input_products import INPUT_PRODUCTS
from .registry import register_rule
from .support import fill_runs, intersect, nonzero_runs


@register_rule(torch.nn.Linear)
class LinearRule(LayerRule):
    kind = "linear"
    supports = ("reduced_ghost", "pairwise_ghost", "direct", "sketch")
    shares_input = True
    #: the output width from which the rule looks for exactly-zero rows of delta (a vocabulary-wide
    #: projection: delta is zero at every position without a supervised label) and computes its
    #: products on the other rows only (drpost.layers.support)
    support_min_width = 8192

    def __init__(self, module: torch.nn.Module, transposed: bool = False):
        super().__init__(module)
        self.transposed = transposed  # Conv1D stores the weight as [in, out]
        w = module.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        self.weight = w if w.requires_grad else None
        b = getattr(module, "bias", None)
        self.bias = b if (b is not None and b.requires_grad) else None
        self.has_bias = self.bias is not None

    # -- layout ------------------------------------------------------------------------------
    def row_axis(self, p):
        return 1 if (self.transposed and p is self.weight) else 0

    def num_rows(self):
        return self.out_features

    def factor_dims(self):
        return self.out_features, self.in_features

    def sketch_dims(self):
        return self.out_features, self.in_features, self.weight is not None, self.has_bias

    @property
    def tied_form(self):
        """A [Vocab, D] output projection without bias can share its weight with embeddings."""
        return TIED_PROJECTION if not (self.transposed or self.has_bias) else None

    # weight in [O, I] orientation
    def _w_oi(self, dtype):
        w = self.module.weight.to(dtype)
        return w.t() if self.transposed else w

    def _to_layout(self, g_oi: torch.Tensor) -> torch.Tensor:
        return g_oi.t() if self.transposed else g_oi

    def input_grad(self, x, d):
        dt = d.dtype
        gx = d @ self._w_oi(dt)
        return gx.to(x.dtype)

    def factors(self, x, d):
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() != 3 else x
        d = d.reshape(d.shape[0], -1, d.shape[-1]) if d.dim() != 3 else d
        return Factors(x.to(d.dtype), d)

    def tap_backward(self, x, d, need_input_grad):
        """A vocabulary-wide delta's zero rows are found once; the input gradient delta W is computed
        on the other rows (into a zeroed [.., I]) and the factors carry them as their support."""
        support = None
        if (self.out_features >= self.support_min_width and d.dim() >= 2 and d.is_contiguous()
                and not torch.is_grad_enabled()):   # (a backward with create_graph keeps the plain path)
            support = nonzero_runs(d.view(-1, d.shape[-1]))
        if support is None:
            return super().tap_backward(x, d, need_input_grad)
        gx = None
        if need_input_grad:
            d2, w = d.view(-1, d.shape[-1]), self._w_oi(d.dtype)
            g = fill_runs(d2, (d2.shape[0], self.in_features), support, lambda lo, hi: d2[lo:hi] @ w)
            gx = g.view(*d.shape[:-1], self.in_features).to(x.dtype)
        with torch.no_grad():
            f = self.factors(x.detach(), d)
        f.support = support
        return gx, f

    @staticmethod
    def _flat(f):
        """The factors as [N * S, I] and [N * S, O] (views: support runs index their rows)."""
        return f.a.reshape(-1, f.a.shape[-1]), f.d.reshape(-1, f.d.shape[-1])

    def cost(self, backend, b, v, s, k):
        o, i = self.out_features, self.in_features
        chosen = 2.0 * k * s * o * i
        if backend == "reduced_ghost":
            return 2.0 * (b + v) * s * o * i + chosen, 4.0 * b * s * o
        if backend == "pairwise_ghost":
            return 2.0 * b * v * s * s * (o + i) + chosen, 8.0 * b * v * s * s
        if backend == "direct":  # materialise, dot, reuse for the chosen sum
            return 2.0 * (b + v) * s * o * i + 4.0 * b * o * i, 4.0 * b * o * i
        raise ValueError(backend)

    # -- target --------------------------------------------------------------------------
    def target_dense(self, f):
        dt = acc_dtype(f.d)
        out = {}
        if self.weight is not None and f.support is not None:
            x2, d2 = self._flat(f)
            g = d2.new_zeros(self.out_features, self.in_features)
            for lo, hi in f.support:
                g.addmm_(d2[lo:hi].t(), x2[lo:hi])
            out[self.weight] = self._to_layout(g).to(dt)
        elif self.weight is not None:
            g = f.d.flatten(0, 1).t() @ f.a.flatten(0, 1)
            out[self.weight] = self._to_layout(g).to(dt)
        if self.bias is not None:
            out[self.bias] = f.d.sum((0, 1), dtype=dt)
        return out

    def _dense_oi(self, dense, dtype):
        g = dense.get(self.weight) if self.weight is not None else None
        if g is not None:
            g = (g.t() if self.transposed else g).to(dtype)
        b = dense.get(self.bias) if self.bias is not None else None
        return g, b

    # -- scores ------------------------------------------------------------------------------
    def dense_scores(self, f, dense, rows):
        dt = acc_dtype(f.d)
        g, b = self._dense_oi(dense, f.d.dtype)
        if f.support is not None and not rows:      # per position on the support, summed per sample
            x2, d2 = self._flat(f)

            def per_position(lo, hi):
                part = torch.zeros(hi - lo, dtype=dt, device=d2.device)
                if g is not None:
                    part += ((x2[lo:hi] @ g.t()) * d2[lo:hi]).sum(1, dtype=dt)
                if b is not None:
                    part += d2[lo:hi].to(dt) @ b.to(dt)
                return part
            return fill_runs(d2, (d2.shape[0],), f.support, per_position, dtype=dt).view(f.n, -1).sum(1)
        per_row = torch.zeros(f.n, self.out_features, dtype=dt, device=f.d.device)
        if g is not None:
            proj = f.a @ g.t()                          # [B, S, O]
            per_row = per_row + (proj * f.d).sum(1, dtype=dt)
        if b is not None:
            per_row = per_row + f.d.sum(1, dtype=dt) * b.to(dt)
        return per_row if rows else per_row.sum(1)

    @staticmethod
    def _cross(t1, t2):
        """(t1_{n,s} . t2_{m,t}) as one GEMM, viewed [N1, S1, N2, S2]."""
        n1, s1, n2, s2 = t1.shape[0], t1.shape[1], t2.shape[0], t2.shape[1]
        return (t1.reshape(n1 * s1, -1) @ t2.reshape(n2 * s2, -1).t()).view(n1, s1, n2, s2)

    @classmethod
    def _cross_d(cls, f, t):
        """``_cross(f.d, t.d)``, with the products computed only between rows in the supports."""
        if f.support is None and t.support is None:
            return cls._cross(f.d, t.d)
        n1, s1, n2, s2 = f.d.shape[0], f.d.shape[1], t.d.shape[0], t.d.shape[1]
        d1, d2 = f.d.reshape(n1 * s1, -1), t.d.reshape(n2 * s2, -1)
        out = d1.new_zeros(n1 * s1, n2 * s2)
        for lo, hi in (f.support if f.support is not None else [(0, n1 * s1)]):
            for tlo, thi in (t.support if t.support is not None else [(0, n2 * s2)]):
                out[lo:hi, tlo:thi] = d1[lo:hi] @ d2[tlo:thi].t()
        return out.view(n1, s1, n2, s2)

    def _input_gram(self, a1, a2):
        """(x_s . x_t) (+1 for the bias column), [N1, S1, N2, S2]."""
        c = (INPUT_PRODUCTS.get(("gram",), (a1, a2), lambda: self._cross(a1, a2))
             if self.weight is not None else None)
        if self.has_bias:
            c = c + 1 if c is not None else a1.new_ones(a1.shape[0], a1.shape[1], a2.shape[0], a2.shape[1])
        return c

    def pairwise_scores(self, f, t, rows):
        dt = acc_dtype(f.d)
        c = self._input_gram(f.a, t.a)                  # [B, S, V, T]
        if rows:
            b, s = c.shape[:2]
            m = (c.reshape(b * s, -1) @ t.d.reshape(-1, t.d.shape[-1])).view(b, s, -1)   # [B, S, O]
            return (m * f.d).sum(1, dtype=dt)
        dd = self._cross_d(f, t)
        return (dd * c).sum((1, 2, 3), dtype=dt)

    def per_sample(self, f):
        dt = acc_dtype(f.d)
        out = {}
        if self.weight is not None:
            g = torch.einsum("bso,bsi->boi", f.d, f.a)
            out[self.weight] = (g.transpose(1, 2) if self.transposed else g).to(dt)
        if self.bias is not None:
            out[self.bias] = f.d.sum(1, dtype=dt)
        return out

    def sketch(self, f, proj, rows):
        xs = proj.right(f.a)        # [N, S, k2]
        if rows:
            return torch.einsum("nso,nsk->nok", f.d, xs).to(acc_dtype(f.d))
        ds = self._left_sketch(f, proj)                                      # [N, S, k1]
        return torch.einsum("nsa,nsb->nab", ds, xs).flatten(1).to(acc_dtype(f.d))

    @staticmethod
    def _left_sketch(f, proj):
        """delta P1, computed on the support's rows only (zero elsewhere)."""
        if f.support is None:
            return proj.left(f.d)
        d2 = f.d.reshape(-1, f.d.shape[-1])
        out = fill_runs(d2, (d2.shape[0], proj.left_side.k), f.support, lambda lo, hi: proj.left(d2[lo:hi]))
        return out.view(f.d.shape[0], f.d.shape[1], -1)

    def sq_norms(self, f, rows):
        dt = acc_dtype(f.d)
        c = torch.einsum("bsi,bti->bst", f.a, f.a) if self.weight is not None else None
        if self.has_bias:
            c = c + 1 if c is not None else f.a.new_ones(f.n, f.a.shape[1], f.a.shape[1])
        if rows:
            return torch.einsum("bsr,bst,btr->br", f.d.to(dt), c.to(dt), f.d.to(dt))
        dd = f.d @ f.d.transpose(1, 2)
        return (dd * c).sum((1, 2), dtype=dt)

    def gram(self, f):
        dt = acc_dtype(f.d)
        c = self._input_gram(f.a, f.a)                  # [B, S, B, T]
        dd = self._cross_d(f, f)
        return (dd * c).sum((1, 3), dtype=dt)

    # -- update -----------------------------------------------------------------------------
    def chosen_into(self, acc, f, w, idx=None):
        """On CPU a top-k subset is read as views of its runs of consecutive rows, each run's GEMM
        accumulated in place (``addmm_``): no gathered copy of delta (for a full-vocabulary
        lm_head, k x S x Vocab floats, whose fresh allocation alone costs more than half its GEMM)
        and no second gradient-sized tensor to add. Elsewhere, or when the factors' dtype is not
        the gradient's (autocast), the rows are gathered."""
        runs = row_runs(idx)
        w_acc = acc.get(self.weight) if self.weight is not None else None
        gdtype = w_acc.dtype if w_acc is not None else (self.weight.dtype if self.weight is not None else None)
        if runs is None or self.weight is None or f.d.dtype != gdtype or f.a.dtype != gdtype:
            return super().chosen_into(acc, f, w, idx)
        bias = None
        if f.support is not None:   # the chosen samples' positions, less the zero rows of delta
            s = f.d.shape[1]
            x2, d2 = self._flat(f)
            spans = [(x2[lo:hi], d2[lo:hi]) for lo, hi in intersect([(a * s, b * s) for a, b in runs], f.support)]
        else:
            spans = [(f.a[lo:hi].flatten(0, 1), f.d[lo:hi].flatten(0, 1)) for lo, hi in runs]
        for x, d in spans:
            left, right = (x.t(), d) if self.transposed else (d.t(), x)
            w_acc = left @ right if w_acc is None else w_acc.addmm_(left, right)
            if self.bias is not None:
                part = d.sum(0, dtype=acc_dtype(f.d))
                bias = part if bias is None else bias + part
        if w_acc is None:           # every chosen row of delta is zero
            w_acc = self.weight.new_zeros(self.weight.shape, dtype=gdtype)
        if self.bias is not None and bias is None:
            bias = self.bias.new_zeros(self.bias.shape, dtype=acc_dtype(f.d))
        acc[self.weight] = w_acc
        if bias is not None:
            add_into(acc, self.bias, bias)

    def chosen(self, f, w):
        dt = acc_dtype(f.d)
        if w is None:       # every row, weight 1
            wd = f.d
        else:
            wd = f.d * (w.to(f.d.dtype)[:, None, :] if w.dim() == 2 else w.to(f.d.dtype)[:, None, None])
        out = {}
        if self.weight is not None:
            g = wd.flatten(0, 1).t() @ f.a.flatten(0, 1)
            out[self.weight] = self._to_layout(g)
        if self.bias is not None:
            out[self.bias] = wd.sum((0, 1), dtype=dt)
        return out


@register_rule("transformers.pytorch_utils.Conv1D")
class Conv1DRule(LinearRule):
    """Hugging Face GPT-2 Conv1D: a linear map whose weight is stored [in, out]."""

    def __init__(self, module: torch.nn.Module):
        super().__init__(module, transposed=True)
