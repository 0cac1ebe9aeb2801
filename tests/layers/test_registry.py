"""register_rule: lookup by MRO (most specific registered class wins), dotted paths resolved
once their module is imported, a later registration replaces an earlier one, and the contract
(what a rule must provide) is enforced when the rule class is registered or built."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from drpost.layers import EmbeddingRule, Factors, LayerRule, LinearRule, register_rule, rule_class_for, scored_rule_for


class MinimalRule(LayerRule):
    def factors(self, a, d):
        return Factors(a, d)

    def input_grad(self, a, d):
        return None

    def per_sample(self, f):
        return {}


def test_builtin_rules():
    assert rule_class_for(nn.Linear) is LinearRule and rule_class_for(nn.Embedding) is EmbeddingRule
    assert rule_class_for(nn.LayerNorm) is None and scored_rule_for(nn.ReLU()) is None
    # subclasses in torch itself (MultiheadAttention's out_proj) inherit the Linear rule
    assert rule_class_for(nn.modules.linear.NonDynamicallyQuantizableLinear) is LinearRule


def test_most_specific_registered_class_wins():
    class MyLinear(nn.Linear):
        pass

    class MyLinearChild(MyLinear):
        pass

    assert type(scored_rule_for(MyLinearChild(2, 3))) is LinearRule

    @register_rule(MyLinear)
    class MyLinearRule(LinearRule):
        pass

    assert type(scored_rule_for(MyLinearChild(2, 3))) is MyLinearRule
    assert type(scored_rule_for(nn.Linear(2, 3))) is LinearRule
    assert register_rule(MyLinear)(MinimalRule) is MinimalRule         # replaces
    assert rule_class_for(MyLinearChild) is MinimalRule


def test_dotted_path_is_resolved_after_import():
    name = "drpost_test_registry_lazy_mod"
    assert name not in sys.modules
    register_rule(f"{name}.Lazy")(MinimalRule)
    mod = types.ModuleType(name)

    class Lazy(nn.Module):
        pass
    mod.Lazy = Lazy
    sys.modules[name] = mod
    try:
        assert rule_class_for(Lazy) is MinimalRule

        @register_rule(f"{name}.Lazy")          # module already imported: replaces at once
        class Other(MinimalRule):
            pass
        assert rule_class_for(Lazy) is Other
    finally:
        del sys.modules[name]


def test_registration_checks():
    with pytest.raises(TypeError, match="not a subclass of drpost.layers.LayerRule"):
        register_rule(nn.Linear)(object)
    with pytest.raises(TypeError, match="module class or its dotted path"):
        register_rule(nn.Linear(2, 2))

    class NoPerSample(LayerRule):
        def factors(self, a, d):
            return Factors(a, d)

        def input_grad(self, a, d):
            return None

    with pytest.raises(TypeError, match="per_sample"):
        NoPerSample(nn.Linear(2, 2))


def test_defaults_from_per_sample_and_layout():
    """The base-class defaults a minimal rule relies on agree with the Linear rule's formulas."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()

    class LinearByDefaults(LayerRule):      # Linear, but only the required methods
        def factors(self, a, d):
            return Factors(a, d)

        def input_grad(self, a, d):
            return d @ self.module.weight

        def per_sample(self, f):
            return {self.module.weight: torch.einsum("bso,bsi->boi", f.d, f.a), self.module.bias: f.d.sum(1)}

    ref, rule = LinearRule(layer), LinearByDefaults(layer)
    f = Factors(torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 4, dtype=torch.float64))
    t = Factors(torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 7, 4, dtype=torch.float64))
    dense = ref.target_dense(t)
    for p, g in rule.target_dense(t).items():
        torch.testing.assert_close(g, dense[p])
    for rows in (False, True):
        torch.testing.assert_close(rule.dense_scores(f, dense, rows), ref.dense_scores(f, dense, rows))
        torch.testing.assert_close(rule.sq_norms(f, rows), ref.sq_norms(f, rows))
    torch.testing.assert_close(rule.gram(f), ref.gram(f))
    for w in (None, torch.rand(3, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)):
        want = ref.chosen(f, w)
        for p, g in rule.chosen(f, w).items():
            torch.testing.assert_close(g, want[p])
    assert rule.num_rows() == 4 and rule.supports == ("reduced_ghost",) and rule.tied_form is None
    assert not rule.broadcast_input_ok
    with pytest.raises(NotImplementedError, match="cost"):
        rule.cost("direct", 1, 1, 1, 1)
