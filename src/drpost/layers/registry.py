"""Which rule handles which module: a registry filled by ``@register_rule(ModuleType)``.

The built-in rules register themselves through the same decorator a user calls::

    from drpost.layers import LayerRule, register_rule

    @register_rule(MyLayer)
    class MyLayerRule(LayerRule):
        ...            # see layers/base.py for what a rule provides

A module is handled by the rule registered for the most specific class in its MRO (a subclass of
nn.Linear gets the Linear rule unless a rule is registered for the subclass itself). A module
type may also be named by its dotted path ("transformers.pytorch_utils.Conv1D"): the name is
resolved only once that module has been imported by someone else, so registering a rule never
imports an optional dependency. A later registration for the same type replaces the earlier one.
"""
from __future__ import annotations

import sys

import torch

from .base import LayerRule
from .norms import RowRestrictedRule, is_norm

_RULES: dict[type, type] = {}
_BY_PATH: dict[str, type] = {}     # dotted module-type names not resolved yet


def register_rule(module_type: type | str):
    """Class decorator: ``rule_cls(module)`` scores every module whose type is (a subclass of)
    ``module_type``. Returns the rule class unchanged."""
    if not isinstance(module_type, (type, str)):
        raise TypeError(f"register_rule takes a module class or its dotted path, not {module_type!r}")

    def deco(rule_cls):
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, LayerRule)):
            raise TypeError(f"register_rule({_label(module_type)}): {rule_cls!r} is not a subclass of "
                            "drpost.layers.LayerRule")
        cls = _imported(module_type) if isinstance(module_type, str) else module_type
        if cls is None:
            _BY_PATH[module_type] = rule_cls
        else:
            _BY_PATH.pop(module_type, None)
            _RULES[cls] = rule_cls
        return rule_cls
    return deco


def _label(module_type) -> str:
    return module_type if isinstance(module_type, str) else module_type.__qualname__


def _imported(path: str):
    """The class named by a dotted path if its module is imported, else None."""
    mod, _, name = path.rpartition(".")
    found = sys.modules.get(mod)
    cls = getattr(found, name, None) if found is not None else None
    return cls if isinstance(cls, type) else None


def _resolve_paths() -> None:
    for path in list(_BY_PATH):
        if path.rpartition(".")[0] not in sys.modules:
            continue
        rule_cls, cls = _BY_PATH.pop(path), _imported(path)
        if cls is not None:     # registered before its module was imported: a later rule for the type wins
            _RULES.setdefault(cls, rule_cls)


def rule_class_for(module_type: type) -> type | None:
    """The registered rule class for a module type (most specific class of its MRO), or None."""
    if _BY_PATH:
        _resolve_paths()
    for cls in module_type.__mro__:
        rule_cls = _RULES.get(cls)
        if rule_cls is not None:
            return rule_cls
    return None


def scored_rule_for(module: torch.nn.Module):
    """A scoring rule for modules whose per-sample gradients drpost can score, else None."""
    rule_cls = rule_class_for(type(module))
    return rule_cls(module) if rule_cls is not None else None


def unscored_rule_for(module: torch.nn.Module):
    """Leaf modules with own trainable parameters that are trained on all general rows."""
    has_children_params = any(p.requires_grad for c in module.children() for p in c.parameters())
    if has_children_params:
        return None
    return RowRestrictedRule(module)


__all__ = ["register_rule", "rule_class_for", "scored_rule_for", "unscored_rule_for", "is_norm"]
