"""Norm layers are trained but never scored: their parameters get the plain gradient of all
general rows, and target rows never reach them (merged strategy: restricted in backward)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models_tiny as mt
from rule_check import BACKENDS, DIM, HIDDEN, RuleCase, check_rule, probe


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_beside_a_scored_layer(norm):
    layer = nn.LayerNorm(DIM) if norm == "layernorm" else mt.ExactRMSNorm(nn.Parameter(torch.ones(DIM)), 1e-6)
    model = probe(nn.Linear(DIM, HIDDEN), norm=layer, seed=15)
    with torch.no_grad():
        for p in model.norm.parameters():
            p.add_(1.0)
    case = RuleCase(model, seed=9)
    assert case.oracle.rest, "the norm's parameters are not scored"
    check_rule(case, backends=BACKENDS[:3])


def test_norm_rule_lookup():
    from drpost.layers import RowRestrictedRule, is_norm, scored_rule_for, unscored_rule_for

    ln = nn.LayerNorm(4)
    assert scored_rule_for(ln) is None and is_norm(ln)
    assert isinstance(unscored_rule_for(ln), RowRestrictedRule)
    assert unscored_rule_for(nn.Sequential(nn.LayerNorm(4))) is None      # not a leaf
    with pytest.raises(ValueError, match="several inputs"):
        unscored_rule_for(ln).capture_input((torch.ones(1), torch.ones(1)), {})


class RowMix(nn.Module):
    """Not row-local: every output row sees the mean of all input rows."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x):
        return x + self.weight * x.mean(0, keepdim=True) ** 2


@pytest.mark.parametrize("module", ["layernorm", "rmsnorm", "rowmix"])
@pytest.mark.parametrize("needs_input_grad", [True, False])
def test_row_restricted_backward(module, needs_input_grad):
    """RowRestrictedRule.backward gives the full input gradient and the general rows' parameter
    gradient, for row-local norms and for a module that mixes rows, in float64 to rounding."""
    from drpost.layers import RowRestrictedRule

    torch.manual_seed(3)
    m = {"layernorm": lambda: nn.LayerNorm(6), "rowmix": RowMix,
         "rmsnorm": lambda: mt.ExactRMSNorm(nn.Parameter(torch.randn(6)), 1e-6)}[module]().double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    rule = RowRestrictedRule(m)
    x = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=needs_input_grad)
    d = torch.randn(5, 3, 6, dtype=torch.float64)
    grad_x, grads = rule.backward(x, d, ("cpu", False, torch.bfloat16), 3)
    xr = x.detach().requires_grad_()
    y = m(xr)
    (want_x,) = torch.autograd.grad(y, xr, d, retain_graph=True)
    dg = d.clone()
    dg[3:] = 0
    want = torch.autograd.grad(y, rule.params, dg)
    if needs_input_grad:
        assert torch.allclose(grad_x, want_x, rtol=1e-12, atol=1e-12)
    else:
        assert grad_x is None
    for p, w in zip(rule.params, want):
        assert torch.allclose(grads[p], w, rtol=1e-12, atol=1e-12)
