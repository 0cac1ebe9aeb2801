"""A module type drpost does not ship a rule for: the test registers one with register_rule and
trains through DataRegularizer, matching the per-sample oracle; unregistered, the same module
gets the documented warning (leaf) or error (parameters no rule covers, merged strategy)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from custom_layer import SCORED_TYPES, PlainScaled, ScaledLinear, ScaledLinearDirectRule, ScaledLinearRule, register
from rule_check import DIM, HIDDEN, RuleCase, check_rule, check_step, probe


def _scaled_model(cls=ScaledLinear, frozen=("embed", "head")):
    model = probe(cls(DIM, HIDDEN), seed=16, frozen=frozen)
    with torch.no_grad():
        model.layer.scale.add_(1.0)
    return model


@pytest.mark.parametrize("rule_cls", [ScaledLinearRule, ScaledLinearDirectRule])
def test_registered_custom_rule_matches_oracle(rule_cls):
    register(rule_cls)
    from drpost.layers import scored_rule_for

    assert type(scored_rule_for(ScaledLinear(2, 3))) is rule_cls
    used = check_rule(RuleCase(_scaled_model(), seed=10, scored_types=SCORED_TYPES))
    for (scoring, _), backends in used.items():
        want = scoring if scoring in rule_cls.supports else "reduced_ghost"
        if scoring == "auto":
            want = backends["layer"]
            assert want in rule_cls.supports
        assert backends == {"layer": want}, (scoring, backends)


def test_unregistered_leaf_module_warns_and_trains_plainly():
    case = RuleCase(_scaled_model(PlainScaled, frozen=("embed",)), seed=10)
    assert [layer.name for layer in case.oracle.layers] == ["head"]
    with pytest.warns(UserWarning, match="layer .*PlainScaled.* is not a scored layer type"):
        check_step(case, "layerwise", "auto", "merged")


class Wrapper(nn.Module):
    """Own parameter plus a child with parameters: no rule covers ``gain``."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(HIDDEN))
        self.inner = nn.Linear(DIM, HIDDEN)

    def forward(self, x):
        return self.inner(x) * self.gain


def test_unregistered_container_is_refused_by_merged_strategy():
    from drpost import DataRegularizer

    model = probe(Wrapper(), seed=17)
    with pytest.raises(ValueError, match=r"layer\.gain.*belong to no layer rule.*target_strategy='separate'"):
        DataRegularizer(model, feasible_set="layerwise", frac=0.5, target_strategy="merged")
    with pytest.warns(UserWarning, match=r"layer\.gain.*not covered by a layer rule"):
        DataRegularizer(model, feasible_set="layerwise", frac=0.5, target_strategy="separate")
