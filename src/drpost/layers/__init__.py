from .base import Factors, LayerRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norms import RowRestrictedRule, is_norm
from .registry import scored_rule_for, unscored_rule_for
from . import tied  # noqa: F401  (used as drpost.layers.tied)

__all__ = ["Factors", "LayerRule", "LinearRule", "EmbeddingRule", "RowRestrictedRule", "is_norm",
           "scored_rule_for", "unscored_rule_for"]
