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
