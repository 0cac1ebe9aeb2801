"""The contract every layer rule answers (DESIGN.md: one small rule per layer type).

A rule sees, for one call of its module, the factors of the per-sample weight gradients: for a
linear map these are the layer input x [N, S, I] and the output gradient delta [N, S, O], and
G_i = sum_s delta_{i,s} x_{i,s}^T. It answers:
  * how to pass the activation gradient on (the chain rule is never changed);
  * how to score samples against a target (dense, pairwise/ghost, materialised, sketched);
  * how to build the weight gradient of a chosen (weighted) subset of samples;
  * the layout of its parameters: which axis of each parameter holds the output rows that the
    row-level feasible set scores and chooses separately.
All target quantities are raw sums over target rows; the engine applies 1/T_target.
Row-level variants (``rows=True``) return one value per output row of the weight ([B, R]).

A rule for a new module type subclasses :class:`LayerRule` and is registered with
``@drpost.layers.register_rule(ModuleType)``. It must provide

  ``factors(a, d)``      the per-call factors (``a``: what ``capture_input`` took, ``d``: the
                         output gradient) as a :class:`Factors` with the sample axis first;
  ``input_grad(a, d)``   the gradient of the module's input (None when the input is not
                         differentiable, e.g. token ids);
  ``per_sample(f)``      {param: [B, *param.shape]} materialised per-sample gradients.

Everything else has a default computed from ``per_sample`` (correct, but it materialises one
gradient per sample): ``target_dense``, ``dense_scores``, ``sq_norms``, ``gram``, ``chosen``.
A rule overrides them with factor formulas (the ghost trick) when it can. It may also declare

  ``supports``           the scoring back-ends it implements (``reduced_ghost`` always; add
                         ``pairwise_ghost`` with ``pairwise_scores``, ``direct`` with ``cost``,
                         ``sketch`` with ``sketch``/``sketch_dims``); a back-end it does not list
                         falls back to ``reduced_ghost``;
  ``cost(backend, ...)`` the modelled cost per back-end (needed by ``scoring="auto"`` when it
                         lists more than one);
  ``row_axis(p)``        the axis of parameter p indexing output rows (default 0);
  ``num_rows()``         R, the number of output rows (default: from the first parameter);
  ``broadcast_input_ok`` True when one input row may be broadcast over the batch (position
                         embeddings indexed by [1, T] ids); the engine refuses it otherwise;
  ``tied_form``          how it takes part in a parameter shared by several modules, for the
                         factor-only tied scores of layers/tied.py: ``"projection"`` (factors x
                         [N, S, D], delta [N, S, V] of a map with weight [V, D], no bias),
                         ``"lookup"`` (factors ids [N, S], delta [N, S, D] of rows gathered
                         from [V, D]), or None: the shared parameter is then scored through the
                         collapsed dense target (``reduced_ghost``), which every rule supports.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from .support import runs_of_indices, slice_runs


@dataclass
class Factors:
    """Per-call factors; ``a`` is the input side (x, or token ids), ``d`` the output gradient.
    ``support``, when known, lists the runs of rows of ``d`` flattened to [N * S, O] outside which
    ``d`` is exactly zero (:mod:`drpost.layers.support`); None: any row may be nonzero. Only the
    rule that found it reads it; a new ``Factors`` built from these without it is still correct."""
    a: torch.Tensor
    d: torch.Tensor
    support: list | None = None

    def rows(self, sl: slice) -> "Factors":
        a, d = self.a[sl], self.d[sl]
        support = None
        if self.support is not None and (sl.step in (None, 1)) and d.dim() >= 2:
            start, stop, _ = sl.indices(self.d.shape[0])
            s = self.d.shape[1]
            support = slice_runs(self.support, start * s, max(start, stop) * s)
        return Factors(a, d, support)

    @staticmethod
    def cat(parts: list["Factors"]) -> "Factors":
        if len(parts) == 1:
            return parts[0]
        s = max(p.a.shape[1] for p in parts)

        def pad(t):
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, s - t.shape[1])) if t.shape[1] < s else t
        return Factors(torch.cat([pad(p.a) for p in parts]), torch.cat([pad(p.d) for p in parts]))

    @property
    def n(self) -> int:
        return self.a.shape[0]


TIED_PROJECTION = "projection"
TIED_LOOKUP = "lookup"


class LayerRule(abc.ABC):
    """Interface; see the module docstring. ``params`` are the module's trainable parameters."""

    kind = "?"
    supports: tuple[str, ...] = ("reduced_ghost",)
    broadcast_input_ok = False
    tied_form: str | None = None
    shares_input = False    # may draw its input-side sketch with the other layers fed its input

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.params = [p for p in module.parameters(recurse=False) if p.requires_grad]

    # -- autograd -------------------------------------------------------------------------
    def capture_input(self, args, kwargs):
        return args[0] if args else next(iter(kwargs.values()))

    @abc.abstractmethod
    def input_grad(self, a: torch.Tensor, d: torch.Tensor):
        """Gradient of the module's input from the captured input and the output gradient."""

    @abc.abstractmethod
    def factors(self, a: torch.Tensor, d: torch.Tensor) -> Factors:
        """The per-sample gradient factors of one call."""

    def tap_backward(self, a: torch.Tensor, d: torch.Tensor, need_input_grad: bool):
        """(the input gradient, or None when not needed; the factors of ``a`` detached) of one call,
        in the module's own layout. A rule may override it to share work between the two (the
        Linear rule finds the zero rows of a vocabulary-wide delta once for both)."""
        grad_a = self.input_grad(a, d) if need_input_grad else None
        with torch.no_grad():   # detached: factors kept past the backward (global sets) build no graph
            return grad_a, self.factors(a.detach(), d)

    # -- layout ------------------------------------------------------------------------------
    def row_axis(self, p: torch.nn.Parameter) -> int:
        """Axis of parameter p that indexes the output rows."""
        return 0

    def num_rows(self) -> int:
        p = self.params[0]
        return p.shape[self.row_axis(p)]

    def _row_shape(self, p: torch.nn.Parameter) -> list[int]:
        shape = [1] * p.dim()
        shape[self.row_axis(p)] = -1
        return shape

    def rows_broadcast(self, p: torch.nn.Parameter, count: torch.Tensor) -> torch.Tensor:
        """A per-row quantity [R] (or a scalar) reshaped to broadcast against parameter p."""
        return count if count.dim() == 0 else count.reshape(self._row_shape(p))

    def row_sum(self, p: torch.nn.Parameter, g: torch.Tensor, rows: bool) -> torch.Tensor:
        """Sum a per-sample quantity [B, *p.shape] to [B], or per output row to [B, R]."""
        if not rows:
            return g.flatten(1).sum(1)
        axis = 1 + self.row_axis(p)
        dims = tuple(i for i in range(1, g.dim()) if i != axis)
        return g.sum(dims) if dims else g

    def factor_dims(self) -> tuple[int, int]:
        """(width of the output-gradient factor, width of the input factor) of a dense map."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its factors as a dense map")

    def sketch_dims(self) -> tuple[int, int, bool, bool]:
        """(output width, input width, weight trained?, bias trained?) for the sketch back-end."""
        raise NotImplementedError(f"{type(self).__name__} does not support the sketch back-end")

    def cost(self, backend: str, b: int, v: int, s: int, k: int) -> tuple[float, float]:
        """(FLOPs, extra bytes) of scoring b samples against v target rows of length s, plus
        building the chosen gradient from k samples."""
        raise NotImplementedError(f"{type(self).__name__} lists back-ends {self.supports} but has no cost "
                                  "model for scoring='auto'; implement cost() or list only 'reduced_ghost'")

    # -- target side ------------------------------------------------------------------------
    def target_dense(self, f: Factors) -> dict:
        """{param: sum over rows of the per-sample gradient}, in float32 or wider."""
        return {p: g.sum(0, dtype=acc_dtype(g)) for p, g in self.per_sample(f).items()}

    # -- scores (all return float32/64, [B] or [B, R]) ------------------------------------
    def dense_scores(self, f: Factors, dense: dict, rows: bool) -> torch.Tensor:
        out = None
        for p, g in self.per_sample(f).items():
            if p in dense:
                sc = self.row_sum(p, g * dense[p].to(g.dtype)[None], rows)
                out = sc if out is None else out + sc
        if out is None:
            out = torch.zeros((f.n, self.num_rows()) if rows else (f.n,), dtype=acc_dtype(f.d), device=f.d.device)
        return out

    def pairwise_scores(self, f: Factors, t: Factors, rows: bool) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not support the pairwise_ghost back-end")

    @abc.abstractmethod
    def per_sample(self, f: Factors) -> dict:
        """{param: [B, *param.shape]} materialised per-sample gradients."""

    def sketch(self, f: Factors, proj, rows: bool) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not support the sketch back-end")

    def sq_norms(self, f: Factors, rows: bool) -> torch.Tensor:
        return sum(self.row_sum(p, g.pow(2), rows) for p, g in self.per_sample(f).items())

    def gram(self, f: Factors) -> torch.Tensor:
        flat = torch.cat([g.flatten(1) for g in self.per_sample(f).values()], 1)
        return flat @ flat.t()

    # -- update -----------------------------------------------------------------------------
    def chosen_into(self, acc: dict, f: Factors, w: torch.Tensor | None, idx: torch.Tensor | None = None) -> None:
        """acc[p] += the chosen samples' gradient, for each of this rule's parameters: the samples
        ``idx`` (a fixed-size subset, weight 1), else every sample weighted by ``w`` (as
        :meth:`chosen`). The default gathers the rows ``idx`` and adds :meth:`chosen`; a rule may
        accumulate in place instead (no gathered copy, no fresh gradient-sized tensor)."""
        if idx is not None:
            f, w = Factors(f.a.index_select(0, idx), f.d.index_select(0, idx)), None
        for p, g in self.chosen(f, w).items():
            add_into(acc, p, g)

    def chosen(self, f: Factors, w: torch.Tensor) -> dict:
        """{param: sum_i w_i G_i} for sample weights w [B] (or [B, R]: per row; None: all ones)."""
        out = {}
        for p, g in self.per_sample(f).items():
            if w is None:
                out[p] = g.sum(0)
            elif w.dim() == 2:
                out[p] = (g * w.to(g.dtype).reshape(w.shape[0], *self._row_shape(p))).sum(0)
            else:
                out[p] = torch.einsum("b,b...->...", w.to(g.dtype), g)
        return out


def add_into(acc: dict, key, g: torch.Tensor, dtype=None) -> None:
    """acc[key] += g (in ``dtype``, default the key's dtype when it is a parameter)."""
    g = g.to(dtype if dtype is not None else key.dtype)
    if key in acc:
        acc[key].add_(g)
    else:
        acc[key] = g.clone() if isinstance(key, torch.Tensor) and g.data_ptr() == key.data_ptr() else g


def row_runs(idx: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """The sample indices ``idx`` as runs of consecutive rows [(start, stop), ...], so that a rule
    can read the chosen rows as views instead of gathering a copy; None when ``idx`` is None,
    empty or on an accelerator (reading it there would sync the device: gather instead)."""
    if idx is None or idx.device.type != "cpu" or idx.numel() == 0:
        return None
    return runs_of_indices(sorted(idx.tolist()))


def acc_dtype(*tensors) -> torch.dtype:
    """float32 bookkeeping, float64 when the inputs are float64 (METHOD §9.19)."""
    dt = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dt = torch.float64
    return dt
