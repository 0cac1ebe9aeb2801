"""nn.Linear through the rule check: with and without bias, and with a frozen weight."""
from __future__ import annotations

import pytest
from torch import nn

from rule_check import BACKENDS, DIM, HIDDEN, RuleCase, check_rule, probe


def _linear(variant: str):
    model = probe(nn.Linear(DIM, HIDDEN, bias=variant != "no_bias"), seed=11)
    if variant == "frozen_weight":
        model.layer.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("variant", ["bias", "no_bias", "frozen_weight"])
def test_linear_rule(variant):
    used = check_rule(RuleCase(_linear(variant), seed=1))
    for (scoring, _), backends in used.items():
        assert set(backends) == {"layer"}
        if scoring != "auto":
            assert backends["layer"] == scoring, (scoring, backends)
        assert backends["layer"] in BACKENDS


def test_linear_layout():
    from drpost.layers import LinearRule, scored_rule_for

    layer = nn.Linear(DIM, HIDDEN)
    rule = scored_rule_for(layer)
    assert type(rule) is LinearRule and rule.num_rows() == HIDDEN
    assert rule.row_axis(layer.weight) == 0 and rule.row_axis(layer.bias) == 0
    assert rule.sketch_dims() == (HIDDEN, DIM, True, True) and rule.factor_dims() == (HIDDEN, DIM)
    assert rule.broadcast_input_ok is False and rule.tied_form is None    # has a bias
    assert scored_rule_for(nn.Linear(DIM, HIDDEN, bias=False)).tied_form == "projection"
