"""The Dr. Post-Training controller: attach to a model, run one forward/backward, fill ``.grad``.

One training step, top to bottom (``DataRegularizer.backward``):
  1. the general rows (and, with the merged strategy, the target rows after them) go through one
     forward; the loss is the SUM of per-token losses, so every per-sample gradient is a token sum
     (:mod:`~drpost.engine.passes`);
  2. during the one backward, each scored module's tap passes the true activation gradient down
     (the chain rule is never changed) and hands the per-sample factors (x, delta) to the per-layer
     pipeline (:mod:`~drpost.engine.hooks`, :mod:`~drpost.engine.pipeline`): the layer's group
     scores its general samples against the target gradient, the feasible set picks its subset
     (:mod:`~drpost.engine.selection`) and the chosen samples' gradient is added to an accumulator;
     ``global`` feasible sets keep the factors until every layer is scored;
  3. ``finalize`` divides each accumulator by the supervised-token count of the samples it holds
     (METHOD §1.6) and adds the result to ``p.grad`` (:mod:`~drpost.engine.reduce`: one process, or
     every rank of a ``torchrun`` job with one global selection). Micro-batches accumulate until
     finalize.
The model is never wrapped: forward hooks are registered on its modules and removed by
``detach()``.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from .. import distributed as _dist
from ..batch import check_batch
from ..group import ScoringConfig
from . import guards
from .hooks import attach, model_device
from .options import DrPostOptions, option_names, overrides_of
from .passes import Passes
from .pipeline import Pipeline
from .reduce import make_reduction
from .reduce_fsdp import refuse_fsdp1
from .state import StepStats, TargetState


class DataRegularizer:
    """Data-regularized post-training on any ``nn.Module`` language model.

    The general batch builds a feasible set of update directions; the target batch defines the
    target gradient g_T; every step follows the member of the feasible set most aligned with g_T.

    Args:
        model: a causal LM; ``model(input_ids=..., attention_mask=...)`` returns logits (or an object
            with ``.logits``). Trainable ``nn.Linear``/GPT-2 ``Conv1D``/``nn.Embedding`` modules are
            scored (PEFT LoRA adapters are such Linears; other types through
            ``drpost.layers.register_rule``); other leaf modules with trainable parameters (norms) are
            trained on all general rows.
        options: a :class:`drpost.DrPostOptions` (feasible set, frac, scoring, target strategy, ...;
            every knob, its default and its help text are declared there). ``**overrides`` replace
            some of its fields: ``DataRegularizer(model, feasible_set="global", frac=0.25)``.
        loss_fn: optional per-token loss ``loss_fn(logits, batch) -> (losses [N, L], mask [N, L])``.
        pad_token_id: the id the target rows are padded with when merged (default: the model config's).
        process_group: the torch.distributed group of the data-parallel ranks (default: the world).
        distributed: None (default) runs distributed when torch.distributed is initialised and the
            group has more than one process; False forces single-process behaviour; True requires
            an initialised group. Distributed, every rank passes its own general rows (the same
            number B on every rank) and its slice of the target rows (or None); the selection and
            the update are those of one process on the concatenated batches (drpost.distributed).
            The model must not be wrapped in DistributedDataParallel: drpost reduces the gradients.
    """

    def __init__(self, model: torch.nn.Module, options: DrPostOptions | None = None, *, loss_fn=None,
                 pad_token_id: int | None = None, process_group=None, distributed: bool | None = None,
                 **overrides):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if _dist.is_ddp(model):
            raise ValueError("drpost got a DistributedDataParallel-wrapped model: pass the unwrapped module "
                             "(ddp_model.module). drpost all-reduces the chosen gradients itself after its "
                             "backward, which DDP's reducer never sees (the scored layers' gradients are "
                             "written by drpost, not by autograd)")
        refuse_fsdp1(model)
        self.options = opts = overrides_of(options, **overrides)
        self.model, self.loss_fn = model, loss_fn
        self.pad_token_id = pad_token_id if pad_token_id is not None else \
            (getattr(getattr(model, "config", None), "pad_token_id", None) or 0)
        kind, k1, k2 = opts.sketch_spec
        scoring_cfg = ScoringConfig(opts.scoring, kind, k1, k2, opts.seed, opts.direct_max_mb * 2 ** 20,
                                    opts.score_norm, target_factors=opts.target_strategy == "merged"
                                    or opts.scoring == "pairwise_ghost",
                                    factor_cache=opts.target_strategy == "separate" and opts.scoring in ("auto", "sketch"))
        self._warned: set = set()
        if opts.global_memory == "recompute" and not (opts.selects and opts.decision_scope == "global"):
            self._warn(f"drpost: global_memory='recompute' has no effect with feasible_set={opts.feasible_set!r} "
                       f"(decision scope {opts.decision_scope!r}): only global-scope sets retain factors until "
                       "the end of the backward; such a set already keeps a per-layer set's memory")
        self._generator = torch.Generator().manual_seed(opts.seed)
        self.steps_finalized = 0         # optimisation steps finished by this regularizer (error messages)
        self._target = TargetState()
        self._reduction = make_reduction(model, process_group, distributed, model_device(model), self.pad_token_id,
                                         self._warn)
        # measured back-end choice in one process only: ranks must agree without a collective
        scoring_cfg.calibrate = opts.auto_calibration == "measure" and not self._reduction.distributed
        self._pipeline = Pipeline(opts, scoring_cfg, self._reduction, self._target, self._generator, self._warn)
        self._passes = Passes(model, loss_fn, self.pad_token_id, self._pipeline, self._reduction)
        self._passes.where = self._where
        self._att = None
        self._attach()
        try:
            self._reduction.check_ranks(self._fingerprint(), opts)
        except BaseException:
            self.detach()
            raise

    # ------------------------------------------------------------------ attach / detach
    def _attach(self) -> None:
        opts = self.options
        self._att = attach(self.model, self._pipeline, selects=opts.selects,
                           merged=opts.target_strategy == "merged", warn=self._warn)
        self._passes.att = self._att
        self._pipeline.groups = self._att.groups

    def attach(self) -> None:
        """Put the hooks back after :meth:`detach` (a no-op while attached). The groups are rebuilt
        from the model's current trainable parameters; the selection RNG is kept. A cached target
        gradient (``target_strategy="separate"``) and its age are kept when the scored layers are
        the same (same modules, the same parameter objects, dtypes and devices); when they changed
        (a parameter frozen or unfrozen, the model moved) the next step captures the target again."""
        if self._att.hooked or not self.options.selects:
            return
        old = self._att.groups
        self._attach()
        if self._target.age is None:
            return
        if [g.signature() for g in old] != [g.signature() for g in self._att.groups]:
            self._target.age = None
            return
        for g_old, g in zip(old, self._att.groups):    # the checkpoint form: rules and parameters by index
            g.load_cache_state(g_old.cache_state())

    def detach(self) -> None:
        """Remove every hook: the model is exactly as before attach."""
        if self._att is not None:
            self._att.remove()
        self._pipeline.step.mode = None

    def _fingerprint(self) -> dict:
        short_digest = _dist.short_digest
        scored = [(g.name, [tuple(p.shape) for p in g.params]) for g in self._att.groups]
        params = [(tuple(p.shape), str(p.dtype)) for p in self._att.trainable]
        return {**self.options.fingerprint(), "pad_token_id": self.pad_token_id,
                "loss_fn": None if self.loss_fn is None else "custom",
                "scored_layers": f"{len(scored)} (shapes {short_digest(scored)})",
                "trainable_parameters": f"{len(params)} (shapes/dtypes {short_digest(params)})"}

    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, stacklevel=3)

    def _where(self) -> str:
        return f"at step {self.steps_finalized + 1} of this DataRegularizer"

    # ------------------------------------------------------------------ what it exposes
    def __getattr__(self, name):
        # the options read as attributes: reg.feasible_set, reg.frac, reg.nonfinite, ...
        opts = self.__dict__.get("options")
        if opts is not None and name in option_names():
            return getattr(opts, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def scope(self) -> str:
        """The decision scope actually used ('layer' or 'global')."""
        return self.options.decision_scope

    @property
    def distributed(self) -> bool:
        return self._reduction.distributed

    @property
    def groups(self) -> list[str]:
        return [g.name for g in self._att.groups]

    @property
    def layer_groups(self) -> list:
        """The scored layers as :class:`drpost.group.LayerGroup` objects (rules, parameters, caches)."""
        return list(self._att.groups)

    @property
    def steps_since_capture(self) -> int | None:
        """Separate strategy: optimisation steps since the cached target was captured (1 right after
        the step that captured it; None: the next step captures it)."""
        return self._target.age

    @property
    def profiler(self):
        return self._pipeline.profiler

    @profiler.setter
    def profiler(self, timer) -> None:
        self._pipeline.profiler = timer

    last_scores = property(lambda self: self._pipeline.last_scores, doc="{layer: scores of the last micro-batch}")
    last_masks = property(lambda self: self._pipeline.last_masks, doc="{layer: mask of the chosen samples}")
    last_global_scores = property(lambda self: self._pipeline.last_global_scores)
    last_global_mask = property(lambda self: self._pipeline.last_global_mask)
    layer_backends = property(lambda self: self._pipeline.layer_backends, doc="{layer: scoring back-end used}")
    layer_backend_reasons = property(lambda self: self._pipeline.layer_backend_reasons,
                                     doc="{layer: why scoring chose its back-end (measured/modelled costs)}")

    @property
    def last_selection(self) -> dict:
        """{layer: LongTensor of chosen general-sample indices} (forces a host sync; not for rowwise)."""
        return {k: m.nonzero().flatten() for k, m in self.last_masks.items() if m.dim() == 1}

    # ------------------------------------------------------------------ changing the strength
    def set_frac(self, frac: float) -> None:
        """Change the regularization strength between optimisation steps (e.g. a trainer choosing it
        online, ``frac='auto'``): checked as ``DrPostOptions.frac`` is (OptionError), applied from the
        next call of :meth:`backward`. Not in the middle of an accumulated step (the micro-batches of
        one step select with one frac). Distributed: every rank must set the same value (the ranks
        compared their options once, at construction)."""
        if self._pipeline.step.stats is not None:      # a micro-batch of this step ran without finalize
            raise RuntimeError("DataRegularizer.set_frac in the middle of an accumulated step: call it before the "
                               "first micro-batch of a step (after the call with finalize=True)")
        self.options = self._pipeline.options = dataclasses.replace(self.options, frac=frac)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything that makes the next steps reproducible: the generator of the ``random``
        feasible set and, with the separate strategy, the cached target gradient and its age."""
        caches = {g.name: c for g in self._att.groups if (c := g.cache_state()) is not None}
        t = self._target
        return {"generator": self._generator.get_state(), "steps_since_capture": t.age,
                "target_caches": caches, "tokens_target_total": t.tokens, "target_loss": t.loss,
                "sketch_seed": self.options.seed, "sketch_inputs_shared": True}

    def load_state_dict(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        t = self._target
        t.age, t.loss = state.get("steps_since_capture"), state.get("target_loss")
        if state.get("tokens_target_total") is not None:
            t.tokens = state["tokens_target_total"]
        by_name = {g.name: g for g in self._att.groups}
        caches = state.get("target_caches", {})
        if not state.get("sketch_inputs_shared") and any(c["kind"] == "sketch" for c in caches.values()):
            # written before layers fed one input drew one input-side sketch: the cached target
            # sketches were projected with other matrices than this engine's, so capture it afresh
            warnings.warn("drpost: the checkpoint's cached target sketches predate shared input sketches; "
                          "the target is captured again at the next step", stacklevel=2)
            caches, t.age = {}, None
        for name, c in caches.items():
            if name not in by_name:
                raise ValueError(f"checkpointed target gradient for layer {name!r}, which this model lacks")
            by_name[name].load_cache_state(c)

    # ------------------------------------------------------------------ the step
    def backward(self, general_batch: dict, target_batch: dict | None = None, *, finalize: bool = True) -> StepStats:
        """One (micro-)step: fill ``p.grad`` like ``loss.backward()`` would.

        With ``finalize=False`` the chosen gradients of this micro-batch are held back and added
        to the next calls'; the call with ``finalize=True`` normalises the whole accumulated step
        by the chosen samples' token counts and writes ``.grad``."""
        opts, red, passes = self.options, self._reduction, self._passes
        device = model_device(self.model)
        general = check_batch(general_batch, "general", device)
        stats = self._pipeline.step.stats = StepStats()     # this call's (micro-batch's) statistics
        self._pipeline.step.finalizing = finalize
        needs_target = opts.feasible_set != "standard" and (
            opts.target_strategy == "merged" or opts.feasible_set == "target_only"
            or self._target.due(opts.refresh_every))
        target = check_batch(target_batch, "target", device) if target_batch is not None else None
        red.require_target(target, needs_target, opts)
        try:
            if not opts.selects:
                passes.plain(general, target)
            else:
                target = red.exchange(general, target, needs_target, opts)
                if opts.target_strategy == "merged":
                    passes.merged(general, target)
                else:
                    if needs_target:
                        passes.capture(target)
                    if not self._pipeline.step.skip:
                        passes.general(general)
        except BaseException as err:
            self._pipeline.new_step()
            fault = self._reduction.fault_of(err)
            if fault is not None:
                raise fault from err
            raise
        return stats if not finalize else self._finish_call(stats)

    def capture_target(self, target_batch: dict | None, chunk_size: int | None = None) -> None:
        """Separate strategy: compute and cache the per-layer target gradient (raw sums), from the
        whole target batch, in chunks of ``chunk_size`` rows if given (chunks are summed).
        Distributed: each rank passes its slice (or None); the slices are gathered first."""
        if self.options.target_strategy != "separate":
            raise ValueError("capture_target is for target_strategy='separate'")
        target = self._reduction.capture_rows(target_batch, model_device(self.model))
        self._passes.capture(target, chunk_size)

    def _finish_call(self, stats: StepStats) -> StepStats:
        try:
            with self._pipeline.phase("assembly"):
                try:
                    self._reduction.finalize(self._pipeline, self._att, self._where())
                finally:
                    self._pipeline.new_step()
                if not stats.skipped:
                    guards.check_grads(self._att, stats, self.options.nonfinite, self._where())
        finally:
            self.steps_finalized += 1
        return stats
