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


class OnePlusRMSNorm(nn.Module):
    """Gemma-style RMSNorm (``(1 + weight) * x / rms(x)``): structurally an RMSNorm, not the closed form's."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.eps = 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _hf_rmsnorm(dim):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(dim, eps=1e-5)


_CLOSED_CASES = [("layernorm", torch.float64, True), ("layernorm", torch.float32, True),
                 ("layernorm_nobias", torch.float64, True), ("exact_rmsnorm", torch.float64, True),
                 ("torch_rmsnorm", torch.float64, True), ("hf_rmsnorm", torch.float32, True),
                 ("hf_rmsnorm", torch.float64, False),   # HF computes in float32: not the float64 closed form
                 ("one_plus_rmsnorm", torch.float64, False)]


@pytest.mark.parametrize("module, dtype, closed, frozen", [c + (None,) for c in _CLOSED_CASES] + [
    ("layernorm", torch.float64, True, "weight"), ("layernorm", torch.float64, True, "bias")])
def test_closed_form_norm_gradients(module, dtype, closed, frozen):
    """RMSNorm / LayerNorm get their gradients in closed form where the formula reproduces the module
    (checked on a probe); the result equals the recomputed autograd gradients (general rows only for
    the parameters) to rounding, and a variant the formula does not fit keeps the recomputation."""
    from drpost.layers import RowRestrictedRule
    from drpost.layers.norms import ClosedForm

    torch.manual_seed(4)
    m = {"layernorm": lambda: nn.LayerNorm(6), "layernorm_nobias": lambda: nn.LayerNorm(6, bias=False),
         "exact_rmsnorm": lambda: mt.ExactRMSNorm(nn.Parameter(torch.randn(6)), 1e-6),
         "torch_rmsnorm": lambda: nn.RMSNorm(6), "hf_rmsnorm": lambda: _hf_rmsnorm(6),
         "one_plus_rmsnorm": lambda: OnePlusRMSNorm(6)}[module]().to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    if frozen is not None:
        getattr(m, frozen).requires_grad_(False)
    rule = RowRestrictedRule(m)
    assert rule.closed is not None      # every one of these looks like a norm
    x = torch.randn(5, 3, 6, dtype=dtype, requires_grad=True) * 3 + 1
    d = torch.randn(5, 3, 6, dtype=dtype)
    state = ("cpu", False, torch.bfloat16)
    grad_x, grads = rule.backward(x, d, state, 3)
    assert rule._closed_form_holds(x, m.weight, state) is closed
    want_x, want = rule._autograd(x, d, state, 3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grad_x, want_x, rtol=tol, atol=tol)
    assert set(grads) == set(want) == set(rule.params)
    for p in rule.params:
        torch.testing.assert_close(grads[p], want[p], rtol=tol, atol=tol)
    assert ClosedForm.of(nn.Linear(3, 3)) is None and ClosedForm.of(nn.LayerNorm((2, 3))) is None


def test_a_hooked_norm_parameter_keeps_the_recomputation():
    """A gradient hook on a norm's parameter still runs (the closed form would bypass autograd)."""
    from drpost.layers import RowRestrictedRule

    m = nn.LayerNorm(6).double()
    seen = []
    m.weight.register_hook(lambda g: seen.append(g.shape) or g * 2)
    rule = RowRestrictedRule(m)
    x = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    d = torch.randn(4, 2, 6, dtype=torch.float64)
    _, grads = rule.backward(x, d, ("cpu", False, torch.bfloat16), 2)
    assert seen == [torch.Size([6])]
    _, plain = RowRestrictedRule(nn.LayerNorm(6).double()).backward(x, d, ("cpu", False, torch.bfloat16), 2)
    torch.testing.assert_close(grads[m.weight], 2 * plain[next(iter(plain))], rtol=1e-12, atol=1e-12)
