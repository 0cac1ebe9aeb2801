"""The contract every layer rule answers (DESIGN.md: one small rule per layer type).

A rule sees, for one call of its module, the factors of the per-sample weight gradients: for a
linear map these are the layer input x [N, S, I] and the output gradient delta [N, S, O], and
G_i = sum_s delta_{i,s} x_{i,s}^T. It answers:
  * how to pass the activation gradient on (the chain rule is never changed);
  * how to score samples against a target (dense, pairwise/ghost, materialised, sketched);
  * how to build the weight gradient of a chosen (weighted) subset of samples.
All target quantities are raw sums over target rows; the engine applies 1/T_target.
Row-level variants (``rows=True``) return one value per output row of the weight ([B, R]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """Per-call factors; ``a`` is the input side (x, or token ids), ``d`` the output gradient."""
    a: torch.Tensor
    d: torch.Tensor

    def rows(self, sl: slice) -> "Factors":
        return Factors(self.a[sl], self.d[sl])

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


class LayerRule:
    """Interface; see the module docstring. ``params`` are the module's trainable parameters."""

    kind = "?"
    supports = ("reduced_ghost", "pairwise_ghost", "direct", "sketch")

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.params = [p for p in module.parameters(recurse=False) if p.requires_grad]

    # -- autograd -------------------------------------------------------------------------
    def capture_input(self, args, kwargs):
        return args[0] if args else next(iter(kwargs.values()))

    def input_grad(self, a: torch.Tensor, d: torch.Tensor):
        raise NotImplementedError

    def factors(self, a: torch.Tensor, d: torch.Tensor) -> Factors:
        raise NotImplementedError

    # -- geometry ----------------------------------------------------------------------------
    def num_rows(self) -> int:
        raise NotImplementedError

    def cost(self, backend: str, b: int, v: int, s: int, k: int) -> tuple[float, float]:
        """(FLOPs, extra bytes) of scoring b samples against v target rows of length s, plus
        building the chosen gradient from k samples."""
        raise NotImplementedError

    # -- target side ------------------------------------------------------------------------
    def target_dense(self, f: Factors) -> dict:
        """{param: sum over rows of the per-sample gradient}, in float32 or wider."""
        raise NotImplementedError

    # -- scores (all return float32/64, [B] or [B, R]) ------------------------------------
    def dense_scores(self, f: Factors, dense: dict, rows: bool) -> torch.Tensor:
        raise NotImplementedError

    def pairwise_scores(self, f: Factors, t: Factors, rows: bool) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, f: Factors) -> dict:
        """{param: [B, *param.shape]} materialised per-sample gradients."""
        raise NotImplementedError

    def sketch(self, f: Factors, proj, rows: bool) -> torch.Tensor:
        raise NotImplementedError

    def sq_norms(self, f: Factors, rows: bool) -> torch.Tensor:
        raise NotImplementedError

    def gram(self, f: Factors) -> torch.Tensor:
        raise NotImplementedError

    # -- update -----------------------------------------------------------------------------
    def chosen(self, f: Factors, w: torch.Tensor) -> dict:
        """{param: sum_i w_i G_i} for sample weights w [B] (or [B, R]: per row; None: all ones)."""
        raise NotImplementedError


def acc_dtype(*tensors) -> torch.dtype:
    """float32 bookkeeping, float64 when the inputs are float64 (METHOD §9.19)."""
    dt = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dt = torch.float64
    return dt
