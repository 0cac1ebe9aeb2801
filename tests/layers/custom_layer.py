"""A module type drpost does not know, y = (x W^T) * scale, and rules a test registers for it.

``ScaledLinearRule`` gives only what layers/base.py requires (factors, input gradient,
per-sample gradients): every score, norm, Gram matrix and chosen update comes from the base
class's materialising defaults. ``ScaledLinearDirectRule`` also lists the ``direct`` back-end and
a cost model, so that ``scoring="auto"`` can choose between the two.
"""
from __future__ import annotations

import torch
from torch import nn

from drpost.layers import Factors, LayerRule, register_rule


class _Scaled(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.scale = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return (x @ self.weight.t()) * self.scale


class ScaledLinear(_Scaled):
    """Registered by the tests (see register())."""


class PlainScaled(_Scaled):
    """The same layer, never registered: drpost must say it cannot score it."""


class ScaledLinearRule(LayerRule):
    kind = "scaled_linear"

    def factors(self, x, d):
        return Factors(x.reshape(x.shape[0], -1, x.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1]))

    def input_grad(self, x, d):
        m = self.module
        return ((d * m.scale.detach().to(d.dtype)) @ m.weight.detach().to(d.dtype)).to(x.dtype)

    def per_sample(self, f):
        m, out = self.module, {}
        w, scale = m.weight.detach(), m.scale.detach()
        if m.weight.requires_grad:
            out[m.weight] = torch.einsum("bso,bsi->boi", f.d * scale, f.a)
        if m.scale.requires_grad:
            out[m.scale] = (f.d * (f.a @ w.t())).sum(1)
        return out


class ScaledLinearDirectRule(ScaledLinearRule):
    supports = ("reduced_ghost", "direct")

    def cost(self, backend, b, v, s, k):
        o, i = self.module.weight.shape
        if backend == "direct":
            return 2.0 * (b + v) * s * o * i, 4.0 * b * o * i
        return 4.0 * (b + v) * s * o * i, 4.0 * b * s * o


def register(rule_cls=ScaledLinearRule):
    """Register ``rule_cls`` for ScaledLinear (a later registration replaces an earlier one)."""
    return register_rule(ScaledLinear)(rule_cls)


SCORED_TYPES = {ScaledLinear: {"weight": 0, "scale": 0}}    # for the oracle: row axis per parameter
