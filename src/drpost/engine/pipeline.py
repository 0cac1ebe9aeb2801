"""The per-layer pipeline: score -> select -> accumulate, run from inside the one backward.

The hooks' tap hands every backward call's factors to :meth:`Pipeline.on_factors`. When all the
calls of a group are in, the group is scored against the target (``capture`` mode caches the
target instead), the feasible set picks its subset (:mod:`drpost.engine.selection`, through the
reduction, which gathers the scores of every rank when distributed) and the chosen samples'
gradient is added to the group's accumulator (distributed, a few groups later: the choice waits
for its score gather, which runs meanwhile). ``global``-scope sets retain the scores of every
layer and decide once, after the backward (:meth:`finish_global`). With ``global_memory='retain'``
they also retain every layer's factors and assemble from them; with ``'recompute'`` they keep only
the scores, and the passes run the backward a second time (``step.second_pass``), in which each
group assembles the chosen samples from its recomputed factors as soon as they are in.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .. import feasible as fs
from ..group import LayerGroup, add_into
from ..layers.input_products import INPUT_PRODUCTS
from ..scoring import cache_reader
from ..scoring.auto import Measure
from . import selection
from .state import StepState, TargetState


def layer_type(group: LayerGroup) -> str:
    """What a group is, for the per-layer-type breakdown: 'tied' (a weight used by several modules),
    else its rule kind and the module's own name ('linear q_proj', 'linear q_proj.lora_A', 'embedding')."""
    if group.multi_use:
        return "tied"
    parts = [p for p in group.names[0].split(".") if p != "default" and not p.isdigit()]
    tail = ".".join(parts[-2:]) if parts and parts[-1].startswith("lora_") else (parts[-1] if parts else "")
    kind = group.rules[0].kind
    return kind if kind == "embedding" else f"{kind} {tail}"


class Pipeline:
    """The sink of the hooks (see :class:`drpost.engine.hooks.Sink`) and the per-layer work."""

    def __init__(self, options, scoring_cfg, reduction, target: TargetState, generator: torch.Generator, warn):
        self.options, self.scoring_cfg, self.reduction = options, scoring_cfg, reduction
        self.target, self.generator, self.warn = target, generator, warn
        self.groups: list[LayerGroup] = []
        self.new_step()
        self.profiler = None             # a drpost.profiling.PhaseTimer (drpost bench)
        self.last_scores: dict = {}
        self.last_masks: dict = {}
        self.last_global_scores = None   # global scope: summed (normalised) scores and the one subset
        self.last_global_mask = None
        self.layer_backends: dict = {}
        self.layer_backend_reasons: dict = {}

    # ------------------------------------------------------------------ what the hooks use
    def phase(self, name: str, group: LayerGroup | None = None):
        """A profiled phase (``drpost bench``), charged to ``group``'s layer type too when given."""
        if self.profiler is None:
            return nullcontext()
        return self.profiler.phase(name, None if group is None else layer_type(group))

    def new_step(self) -> None:
        """The one place a step's state is created: at start-up, after every finalize and after an error."""
        for g in self.groups:
            g.reset()
        self.step = StepState()
        INPUT_PRODUCTS.clear()

    def begin_forward(self, mode, rows: int, n_general: int, n_target: int, layout=None) -> None:
        self.step.begin_forward(mode, rows, n_general, n_target, layout)
        for g in self.groups:
            g.calls, g.pending, g.received = 0, [], 0

    # ------------------------------------------------------------------ what the hooks hand in
    def on_plain_grads(self, grads: dict) -> None:
        for p, g in grads.items():
            add_into(self.step.plain_acc, p, g)

    def on_factors(self, group: LayerGroup, rule, f) -> None:
        step = self.step
        group.received += 1
        if step.mode == "capture":
            group.pending.append((rule, None, f))
        elif step.mode == "merged":
            b = step.n_general
            group.pending.append((rule, f.rows(slice(0, b)), f.rows(slice(b, None))))
        else:
            group.pending.append((rule, f, None))
        if len(group.pending) == group.calls:
            self._complete(group)

    def _complete(self, group: LayerGroup) -> None:
        if self.step.mode == "capture":
            self._capture_group(group)
        elif self.step.second_pass:
            mask, full_mask = self.step.global_choice
            self._assemble(group, group.take_pending(), mask, None, full_mask)
        else:
            self._process_group(group)

    @property
    def recomputes_global(self) -> bool:
        """Does a selecting backward run twice (global scope, ``global_memory='recompute'``)?"""
        return self.options.decision_scope == "global" and self.options.global_memory == "recompute"

    def begin_second_pass(self) -> None:
        """The backward over the same graph again: every group waits for its calls' factors anew."""
        for g in self.groups:
            g.pending, g.received = [], 0

    def flush_pending(self) -> None:
        """Groups whose every forward call did not reach the loss (e.g. a module called twice with
        one output unused) are processed with the calls that did; then every open layerwise choice
        is finished (the end of a backward)."""
        for group in self.groups:
            if group.pending:
                group.calls = len(group.pending)
                self._complete(group)
        self._decide(0)
        INPUT_PRODUCTS.clear()   # the end of a backward's scoring: keep no input alive past it

    def check_recomputed(self) -> None:
        """After a backward whose forward ran scored modules with autograd off (the first forward
        of a reentrant activation checkpoint): every such layer must have been recomputed. It is
        not when no input of the checkpointed block requires grad (torch then warns and skips the
        block's backward), which would silently leave those layers untrained."""
        if not self.step.grad_off:
            return
        missing = [g.name for g in self.groups if g.calls and not g.received]
        if missing:
            raise RuntimeError(
                f"layers {missing[:4]}{' ...' if len(missing) > 4 else ''} ran inside a reentrant activation "
                "checkpoint (use_reentrant=True) and got no gradient: no input of the checkpointed block "
                "requires grad (frozen embeddings, e.g. a LoRA model), so torch never recomputes it; call "
                "model.enable_input_require_grads() before training, or checkpoint with use_reentrant=False")

    # ------------------------------------------------------------------ score
    def _shape(self, s: int):
        b, v = self.step.n_general, self.step.n_target
        return b, v, s, fs.num_selected(max(b, 1), self.options.frac)

    def _measure(self, f, group: LayerGroup) -> Measure | None:
        """What auto_calibration='measure' times a layer's candidates with (None: the cost model)."""
        if not self.scoring_cfg.calibrate or self.options.feasible_set == "rowwise":
            return None
        merged = self.step.mode == "merged"
        return Measure(f.d.dtype, f.d.device, 1.0 if merged else 0.0, input_sharers=max(len(group.input_sharers), 1))

    def _capture_group(self, group: LayerGroup) -> None:
        parts = group.take_pending()
        if group.cache is not None:   # a later chunk of this capture: extend the form the first one chose
            backend = cache_reader(group.cache["kind"]).name
        else:
            backend = group.backend(self.scoring_cfg, parts[0][0], *self._shape(parts[0][2].a.shape[1]))
        with self.phase("target_capture"):
            group.capture(self.scoring_cfg, parts, backend, self.options.feasible_set == "rowwise")

    def _process_group(self, group: LayerGroup) -> None:
        """All backward calls of a group are in: score, then choose (or wait for the global choice)."""
        cfg, parts, step = self.scoring_cfg, group.take_pending(), self.step
        rows = self.options.feasible_set == "rowwise"
        shape = self._shape(parts[0][1].a.shape[1])
        with self.phase("scoring", group):
            measure = self._measure(parts[0][1], group)
            if step.mode == "merged":
                backend = group.backend(cfg, parts[0][0], *shape, measure)
                target = group.target_repr(cfg, parts, backend, rows)
            else:
                backend, target = group.cached_target(cfg, parts[0][0], *shape, measure)
            self.layer_backends[group.name] = backend
            self.layer_backend_reasons[group.name] = group.backend_reason
            raw, per_sample = group.scores(cfg, parts, target, backend, rows)
            scores = raw / self.target.tokens
            self.last_scores[group.name] = scores
            flag = ~torch.isfinite(scores).all()
            group.bad = flag if group.bad is None else (group.bad | flag)
            normed = group.normalise(cfg, parts, scores, target, backend, rows, step.tokens_general,
                                     self.target.tokens)
            needs_gram = selection.SELECTIONS[self.options.feasible_set].needs_gram
            gram = group.gram(cfg, parts, backend) if needs_gram else None
        if self.options.decision_scope == "global":
            if self.recomputes_global:   # the factors are recomputed by the second backward
                parts = per_sample = None
            step.retained.append((group, parts, normed, gram, per_sample))
            return
        with self.phase("selection"):
            decide = self.reduction.start_choice(self, normed, gram, group.index)
        step.undecided.append((group, parts, per_sample, decide))
        self._decide(self.reduction.decision_window)

    def _decide(self, keep: int) -> None:
        """Finish the oldest layerwise choices (and assemble their chosen samples) until at most
        ``keep`` are left open: distributed, a choice waits for its score gather, launched when the
        group was scored (:meth:`DistributedReduction.start_choice`); the order is the scoring order
        on every rank."""
        undecided = self.step.undecided
        while len(undecided) > keep:
            group, parts, per_sample, decide = undecided.popleft()
            with self.phase("selection"):
                mask, full_mask = decide()
            self._assemble(group, parts, mask, per_sample, full_mask)

    # ------------------------------------------------------------------ select
    def select(self, scores: torch.Tensor, gram) -> torch.Tensor:
        """The feasible set applied to ``scores`` (this process's, or every rank's gathered)."""
        return selection.select(self.options, scores, gram, self.generator, self.step.tokens_general, self.warn)

    def finish_global(self) -> None:
        """After the backward: the one decision of a global-scope set, applied to every group."""
        self.flush_pending()
        retained, self.step.retained = self.step.retained, []
        if not retained:
            return
        total = sum(r[2] for r in retained)
        gram = sum(r[3] for r in retained) if selection.SELECTIONS[self.options.feasible_set].needs_gram else None
        self.last_global_scores = total
        with self.phase("selection"):
            mask, full_mask = self.reduction.choose(self, total, gram, -1)
        self.last_global_mask = mask
        if self.recomputes_global:
            self.step.global_choice = (mask, full_mask)
            return
        # each group's factors are released once its chosen samples are assembled, so the peak is
        # the retained factors plus one group's gradient, not plus every group's
        retained.reverse()
        while retained:
            group, parts, _, _, per_sample = retained.pop()
            self._assemble(group, parts, mask, per_sample, full_mask)
            del parts, per_sample

    # ------------------------------------------------------------------ accumulate
    def _assemble(self, group, parts, mask, per_sample=None, full_mask=None) -> None:
        """The chosen samples' gradient of one group (summed into its accumulator). ``full_mask``
        (distributed) is the mask over every rank's samples: this rank's share of a global top-k
        has no fixed size, so (as for ``filter``) its rows are gathered on CPU and weighted on a GPU,
        where finding them would sync the device."""
        with self.phase("weight_grad", group), torch.no_grad():
            self.last_masks[group.name] = mask
            tokens = self.step.tokens_general
            shown = mask if full_mask is None else full_mask
            k = selection.fixed_k(self.options, mask) if full_mask is None else None
            idx = None
            weights = mask.to(tokens.dtype)
            if k is not None:
                # a top-k set has a known size: gather its rows without a host sync
                idx = torch.sort(mask.to(torch.uint8), descending=True, stable=True).indices[:k]
            elif selection.keeps_all(self.options, shown):
                weights = None     # k == B: every sample
            elif mask.dim() == 1 and mask.device.type == "cpu":
                # a subset of no fixed size (filter; this rank's share of a global top-k): gathered too
                # where finding its rows needs no device sync (on a GPU they stay weighted)
                idx = mask.nonzero().flatten()
            count = group.accumulate(parts, weights, idx, per_sample, tokens)
            # distributed: the number chosen over all ranks (known from the gathered mask); tokens are this rank's
            stats = self.step.stats
            stats.selected[group.name] = shown.sum() if shown.dim() == 1 else shown.sum(0).float().mean()
            stats.selected_tokens[group.name] = count
        self.reduction.on_assembled(self, group)
