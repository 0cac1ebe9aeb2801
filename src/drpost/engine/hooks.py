"""Attaching to a model: which modules are scored, the forward hooks, and the autograd tap.

:func:`attach` walks the model once: every module with trainable parameters that a layer rule
scores joins a :class:`~drpost.group.LayerGroup` (a parameter shared by several modules, such as
tied embeddings, makes one group); other leaf modules with trainable parameters (norms) get a
row-restricted rule; the rest of the trainable parameters are "plain" (ordinary autograd).

During a selecting forward each hook wraps its module's output in :class:`_Tap`, an identity
in forward. In backward the tap passes the true activation gradient down (the chain rule is
never changed) and hands the per-sample factors ``(x, delta)`` to the **sink** it was given
(the per-layer pipeline); it never calls into the controller. The sink tells the hooks whether
they are active and how many rows the running batch has (``sink.step``).

In a packed batch a sample is one sequence: the tap hands the rule its factors in the sample
layout of ``sink.step.layout`` ([S, Tmax, ...], :mod:`drpost.packing`), while the true input
gradient keeps the module's own [N, T, ...] shape.

Activation checkpointing (``torch.utils.checkpoint``, which Hugging Face's
``gradient_checkpointing_enable`` applies per decoder layer) runs the hooks of a checkpointed
block a second time, inside the backward. The hooks are idempotent under that recomputation:
they count a call (``group.calls``, which the pipeline waits for) only outside the backward
(``step.in_backward``, set by the passes) and otherwise only overwrite (``pending_output``), and
they always apply the tap, so the recomputed forward saves what the first one saved. Non-reentrant
checkpointing keeps the first forward's taps (their saved input comes from the recomputation) and
drops the recomputed graph; reentrant checkpointing runs the first forward without autograd (its
taps record nothing, ``step.grad_off`` marks it) and backpropagates the recomputed taps. Either
way each call's factors reach the sink exactly once.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..group import LayerGroup
from ..layers import RowRestrictedRule, is_norm, scored_rule_for, unscored_rule_for

_CONTAINERS = (torch.nn.ParameterDict, torch.nn.ParameterList)


class Sink(Protocol):
    """What the hooks hand their work to (:class:`drpost.engine.pipeline.Pipeline`). Its ``step``
    (:class:`~drpost.engine.state.StepState`) says whether the hooks are active (``mode``: None =
    idle, "merged" | "capture" | "general"), how many rows the running forward has (``rows``), how
    many of its samples are general (``n_general``, the first ones) and its sample ``layout``
    (a packed row holds several samples; :mod:`drpost.packing`)."""
    step: object

    def phase(self, name: str): ...
    def on_factors(self, group: LayerGroup, rule, factors) -> None: ...
    def on_plain_grads(self, grads: dict) -> None: ...


class _Use:
    __slots__ = ("group", "rule", "state")

    def __init__(self, group, rule, state=None):
        self.group, self.rule, self.state = group, rule, state


class _Tap(torch.autograd.Function):
    """Identity on the module's output in forward; in backward, the rule's input gradient, and
    the factors handed to the sink. Parameters are inputs so that backward always runs, but their
    gradient is returned as None: the engine assembles it."""

    @staticmethod
    def forward(ctx, attachment, use, a, *params):
        ctx.sink, ctx.use, ctx.n_params = attachment.sink, use, len(params)
        ctx.save_for_backward(a)
        out, attachment.pending_output = attachment.pending_output, None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (a,) = ctx.saved_tensors
        use, sink, need = ctx.use, ctx.sink, ctx.needs_input_grad[2]
        layout = sink.step.layout
        if use.group is None:   # row-restricted (norm) layer in a merged batch
            with sink.phase("norm_rules"):
                # general and target samples never share a row: restrict to the general rows
                general_rows = sink.step.n_general if layout is None else layout.rows_of(sink.step.n_general)
                grad_x, grads = use.rule.backward(a, grad_out, use.state, general_rows)
                if not sink.step.second_pass:   # the recomputing backward's norm gradients are the first's
                    with torch.no_grad():
                        sink.on_plain_grads(grads)
            grad_a = grad_x if need else None
        else:
            if layout is not None and not layout.identity:   # packed: factors in the sample layout
                grad_a = use.rule.input_grad(a, grad_out) if need else None
                with torch.no_grad():   # detached: factors kept past the backward build no graph
                    factors = use.rule.factors(layout.samples(a).detach(), layout.samples(grad_out))
            else:
                grad_a, factors = use.rule.tap_backward(a, grad_out, need)
            with torch.no_grad():
                sink.on_factors(use.group, use.rule, factors)
        return (None, None, grad_a) + (None,) * ctx.n_params


class Attachment:
    """The hooks on one model and what they found: scored groups, row-restricted rules, the
    trainable and the plain (unscored) parameters. :meth:`remove` leaves the model as it was."""

    def __init__(self, model: torch.nn.Module, sink: Sink):
        self.model, self.sink = model, sink
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.groups: list[LayerGroup] = []
        self.row_rules: list[RowRestrictedRule] = []
        self.plain_params: list[torch.nn.Parameter] = []
        self.handles: list = []
        self.pending_output = None

    @property
    def hooked(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def param_name(self, param) -> str:
        for n, p in self.model.named_parameters():
            if p is param:
                return n
        return "a parameter"

    # ------------------------------------------------------------------ hooks
    def scored_hook(self, group: LayerGroup, rule):
        sink = self.sink

        def hook(module, args, kwargs, output):
            step = sink.step
            if step.mode is None:
                return None
            if not step.in_backward:   # a call seen inside the backward is a recomputation: not counted
                group.calls += 1
                if not torch.is_grad_enabled():
                    step.grad_off = True
            a = rule.capture_input(args, kwargs)
            if not step.in_backward:
                step.note_input(group, a)
            out = output.detach()
            if a.shape[0] == 1 and step.rows > 1:
                if not rule.broadcast_input_ok:
                    raise ValueError(f"{group.name} was called with one row in a batch of {step.rows}: "
                                     "per-sample gradients cannot be separated from a broadcast input")
                # position embeddings indexed by [1, T] ids and broadcast over the batch: make the
                # broadcast explicit so that every row's output gradient is seen separately
                a = a.expand(step.rows, *a.shape[1:])
                out = out.expand(step.rows, *out.shape[1:]).contiguous()
            self.pending_output = out
            return _Tap.apply(self, _Use(group, rule), a, *rule.params)
        return hook

    def row_hook(self, rule: RowRestrictedRule):
        sink = self.sink

        def hook(module, args, kwargs, output):
            if sink.step.mode != "merged":
                return None   # separate strategy: plain autograd, target pass does not reach .grad
            x = rule.capture_input(args, kwargs)
            if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
                raise ValueError(f"{type(module).__name__} has trainable parameters but does not map one "
                                 "tensor to one tensor, so drpost cannot keep target rows out of its "
                                 "gradient; use target_strategy='separate' or freeze it")
            dev = x.device.type
            state = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            self.pending_output = output.detach()
            return _Tap.apply(self, _Use(None, rule, state), x, *rule.params)
        return hook


def attach(model: torch.nn.Module, sink: Sink, *, selects: bool, merged: bool,
           warn: Callable[[str], None]) -> Attachment:
    """Discover the scored layers of ``model`` and register the hooks (none when the feasible set
    does not select: then every trainable parameter is plain)."""
    att = Attachment(model, sink)
    if not att.trainable:
        raise ValueError("the model has no trainable layer (every parameter has requires_grad=False): "
                         "nothing to post-train")
    if not selects:
        att.plain_params = att.trainable
        return att
    try:
        _register(att, warn)
        _check_coverage(att, merged, warn)
    except BaseException:
        att.remove()
        raise
    return att


def _register(att: Attachment, warn) -> None:
    group_of: dict[int, LayerGroup] = {}
    row_params: set[int] = set()
    for name, module in att.model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule = scored_rule_for(module)
        if rule is not None:
            groups = {id(group_of[id(p)]): group_of[id(p)] for p in own if id(p) in group_of}
            group = next(iter(groups.values())) if groups else LayerGroup(len(att.groups))
            if len(groups) > 1:
                raise ValueError(f"{name} shares parameters with several scored layers; not supported")
            if not groups:
                att.groups.append(group)
            group.names.append(name)
            group.rules.append(rule)
            for p in own:
                if id(p) not in group_of:
                    group_of[id(p)] = group
                    group.params.append(p)
            att.handles.append(module.register_forward_hook(att.scored_hook(group, rule), with_kwargs=True))
        elif not isinstance(module, _CONTAINERS) and unscored_rule_for(module) is not None:
            if any(id(p) in group_of for p in own):
                raise ValueError(f"{name} shares a parameter with a scored layer; not supported")
            rrule = RowRestrictedRule(module)
            att.row_rules.append(rrule)
            row_params.update(id(p) for p in own)
            att.handles.append(module.register_forward_hook(att.row_hook(rrule), with_kwargs=True))
            if not is_norm(module):
                warn(f"drpost: {name} ({type(module).__name__}) is not a scored layer type; its "
                     "parameters get the plain general-batch gradient (no selection); score it by "
                     "registering a rule with drpost.layers.register_rule")
    att.row_param_ids = row_params


def _check_coverage(att: Attachment, merged: bool, warn) -> None:
    if not att.groups:
        raise ValueError("the model has no supported layer with trainable parameters: drpost scores "
                         "nn.Linear, GPT-2 Conv1D, nn.Embedding and PEFT LoRA adapters; unfreeze one of "
                         "them or use feasible_set='standard'")
    scored = {id(p) for g in att.groups for p in g.params}
    att.plain_params = [p for p in att.trainable if id(p) not in scored]
    uncovered = [n for n, p in att.model.named_parameters() if p.requires_grad
                 and id(p) not in scored and id(p) not in att.row_param_ids]
    if not uncovered:
        return
    if merged:
        raise ValueError(f"parameters {uncovered} belong to no layer rule, so the merged strategy "
                         "cannot keep the target rows out of their gradient; use "
                         "target_strategy='separate' (they then get the plain general-batch gradient)")
    warn(f"drpost: parameters {uncovered} are not covered by a layer rule; they get the "
         "plain general-batch gradient (no selection)")


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
