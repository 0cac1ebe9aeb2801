"""The engine's state, created in one place each: per call (:class:`StepStats`), per optimisation
step (:class:`StepState`, which micro-batches add to until finalize) and per target capture
(:class:`TargetState`)."""
from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from ..layers.input_products import tensor_key


@dataclass
class StepStats:
    """What one ``backward`` call (one micro-batch) saw. Tensors stay on the device until
    ``to_dict``; ``skipped`` is set on the call that finalizes a dropped step. Distributed,
    ``selected`` counts the samples chosen over all ranks; the losses, token counts and
    ``selected_tokens`` are this rank's."""
    general_loss: torch.Tensor | None = None
    target_loss: torch.Tensor | None = None
    general_tokens: torch.Tensor | None = None
    target_tokens: torch.Tensor | None = None
    selected: dict = field(default_factory=dict)       # layer -> number of chosen samples (or rows x samples)
    selected_tokens: dict = field(default_factory=dict)
    skipped: bool = False

    def add(self, role: str, loss_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        """Token-weighted loss over the parts of this call (target_only reports both batches)."""
        old_t = getattr(self, f"{role}_tokens")
        old_l = getattr(self, f"{role}_loss")
        total_t = tokens if old_t is None else old_t + tokens
        total_sum = loss_sum if old_t is None else old_l * old_t + loss_sum
        setattr(self, f"{role}_tokens", total_t)
        setattr(self, f"{role}_loss", total_sum / total_t.clamp_min(1))

    def to_dict(self) -> dict:
        def f(t):
            return None if t is None else float(t)
        out = {"general_loss": f(self.general_loss), "target_loss": f(self.target_loss),
               "general_tokens": f(self.general_tokens), "target_tokens": f(self.target_tokens),
               "skipped": bool(self.skipped)}
        if self.selected:
            counts = [float(v) for v in self.selected.values()]
            out["selected_mean"] = sum(counts) / len(counts)
            out["selected_min"] = min(counts)
            out["selected_max"] = max(counts)
            out["selected"] = dict(zip(self.selected.keys(), counts))
        return out


class StepState:
    """One optimisation step: what its micro-batches accumulate until finalize, and what the
    forward pass running now is. A fresh one is made after every finalize (and after an error)."""

    def __init__(self):
        self.mode: str | None = None   # None (hooks idle) | "merged" | "capture" | "general"
        self.rows = 0                  # rows of the batch in the current forward
        self.n_general = 0             # general samples of the current forward (the first ones of a merged batch)
        self.n_target = 0              # (a sample is a row, or one sequence of a packed row)
        self.layout = None             # the current forward's drpost.packing.Layout (None: one sample per row)
        self.tokens_general: torch.Tensor | None = None   # supervised tokens per general sample [B]
        self.plain_acc: dict = {}      # raw token-sum gradients of the unscored parameters
        self.plain_tokens: torch.Tensor | None = None
        self.retained: list = []       # global scope: (group, parts, normalised scores, gram, per_sample)
        self.undecided = deque()       # layerwise choices still open: (group, parts, per_sample, decide)
        # global_memory='recompute': the one decision (mask, full mask) taken after the first backward,
        # applied by the second backward over the same graph (``second_pass``), group by group
        self.global_choice = None
        self.skip = False              # a non-finite loss was seen (one process, nonfinite='skip')
        self.bad_loss: str | None = None   # distributed: which non-finite loss this rank saw
        self.tags_ok = None            # distributed: did every score gather pair the same layers?
        self.stats: StepStats | None = None   # the running call's statistics
        # activation checkpointing (hooks.py): forward calls seen while ``in_backward`` are
        # recomputations and are not counted; ``grad_off`` marks a selecting forward in which a
        # scored module ran with autograd disabled (the first forward of a reentrant checkpoint)
        self.in_backward = False
        self.grad_off = False
        self.finalizing = False        # the running call finalizes the step (its accumulators become final)
        self.overlap = None            # the reduction's gradient reductions in flight (distributed)
        self.input_users: dict = {}    # this forward's inputs of scored layers -> (weakref, names of their groups)

    def begin_forward(self, mode: str | None, rows: int, n_general: int, n_target: int, layout=None) -> None:
        self.mode, self.rows, self.n_general, self.n_target = mode, rows, n_general, n_target
        self.layout = layout
        self.in_backward, self.grad_off = False, False
        self.input_users = {}

    def note_input(self, group, a: torch.Tensor) -> None:
        """Record that ``group`` read ``a`` in this forward: groups fed one live tensor (q/k/v,
        gate/up) share its input-side Gram (``group.input_sharers``, the set of their names). A key
        whose tensor has died (its memory reused: activation checkpointing) starts afresh."""
        key = tensor_key(a)
        entry = self.input_users.get(key)
        if entry is None or entry[0]() is None:
            entry = self.input_users[key] = (weakref.ref(a), set())
        entry[1].add(group.name)
        group.input_sharers = entry[1]

    @property
    def second_pass(self) -> bool:
        """Is the running backward global_memory='recompute''s second one (the decision is taken)?"""
        return self.global_choice is not None

    def add_plain_tokens(self, tokens: torch.Tensor) -> None:
        self.plain_tokens = tokens if self.plain_tokens is None else self.plain_tokens + tokens


class TargetState:
    """The target side of the step: its supervised-token count T_target (every raw score is
    divided by it) and, with the separate strategy, the loss and age of the cached capture."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.age: int | None = None     # optimisation steps since the capture (None: capture next step)

    def due(self, refresh_every: int) -> bool:
        return self.age is None or self.age >= refresh_every
