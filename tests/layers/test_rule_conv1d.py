"""Hugging Face GPT-2 Conv1D (weight stored [in, out]) through the rule check."""
from __future__ import annotations

import torch

from rule_check import DIM, HIDDEN, RuleCase, check_rule, probe


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(HIDDEN, DIM)


def test_conv1d_rule():
    used = check_rule(RuleCase(probe(_conv1d(), seed=12), seed=2))
    assert used[("sketch", "merged")]["layer"] == "sketch"


def test_conv1d_layout():
    from drpost.layers import Conv1DRule, rule_class_for, scored_rule_for
    from transformers.pytorch_utils import Conv1D

    assert rule_class_for(Conv1D) is Conv1DRule
    layer = _conv1d()
    rule = scored_rule_for(layer)
    assert rule.transposed and rule.num_rows() == HIDDEN and rule.tied_form is None
    assert rule.row_axis(layer.weight) == 1 and rule.row_axis(layer.bias) == 0
    count = torch.arange(HIDDEN, dtype=torch.float64)
    assert rule.rows_broadcast(layer.weight, count).shape == (1, HIDDEN)
    assert rule.rows_broadcast(layer.bias, count).shape == (HIDDEN,)
    g = torch.randn(3, DIM, HIDDEN)
    assert torch.equal(rule.row_sum(layer.weight, g, True), g.sum(1))
