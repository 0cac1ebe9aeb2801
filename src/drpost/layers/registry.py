"""Which rule handles which module. Adding a layer type = one rule class + one entry here."""
from __future__ import annotations

import torch

from .embedding import EmbeddingRule
from .linear import LinearRule
from .norms import RowRestrictedRule, is_norm


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers missing or moved
        return None


def scored_rule_for(module: torch.nn.Module):
    """A scoring rule for modules whose per-sample gradients drpost can score, else None."""
    if isinstance(module, torch.nn.Linear):
        return LinearRule(module)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return LinearRule(module, transposed=True)
    if isinstance(module, torch.nn.Embedding):
        return EmbeddingRule(module)
    return None


def unscored_rule_for(module: torch.nn.Module):
    """Leaf modules with own trainable parameters that are trained on all general rows."""
    has_children_params = any(p.requires_grad for c in module.children() for p in c.parameters())
    if has_children_params:
        return None
    return RowRestrictedRule(module)


__all__ = ["scored_rule_for", "unscored_rule_for", "is_norm"]
