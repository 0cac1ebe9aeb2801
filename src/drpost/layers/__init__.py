"""Layer rules: what drpost knows about each module type (layers/base.py has the contract).
Add a layer type with ``@register_rule(ModuleType)`` on a :class:`LayerRule` subclass."""
from .base import TIED_LOOKUP, TIED_PROJECTION, Factors, LayerRule
from .registry import register_rule, rule_class_for, scored_rule_for, unscored_rule_for
from .embedding import EmbeddingRule
from .linear import Conv1DRule, LinearRule
from .norms import RowRestrictedRule, is_norm
from . import tied  # noqa: F401  (used as drpost.layers.tied)

__all__ = ["Factors", "LayerRule", "TIED_LOOKUP", "TIED_PROJECTION", "LinearRule", "Conv1DRule",
           "EmbeddingRule", "RowRestrictedRule", "is_norm", "register_rule", "rule_class_for",
           "scored_rule_for", "unscored_rule_for"]
