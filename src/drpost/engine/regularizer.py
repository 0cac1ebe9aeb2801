"""The Dr. Post-Training controller: attach to a model, run one forward/backward, fill ``.grad``.

One training step, top to bottom (``DataRegularizer.backward``):
  1. the general rows (and, with the merged strategy, the target rows after them) go through one
     forward; the loss is the SUM of per-token losses, so every per-sample gradient is a token sum;
  2. during the one backward, each scored module's tap passes the true activation gradient down
     (the chain rule is never changed) and hands the per-sample factors (x, delta) to its layer
     group; a group scores its general samples against the target gradient, picks its feasible
     subset and adds the chosen samples' gradient to an accumulator, then frees the factors;
     ``global`` feasible sets keep the factors until every layer is scored;
  3. ``finalize`` divides each accumulator by the supervised-token count of the samples it holds
     (METHOD §1.6) and adds the result to ``p.grad``. Micro-batches accumulate until finalize.
The model is never wrapped: forward hooks are registered on its modules and removed by
``detach()``.

Under ``torchrun`` (torch.distributed initialised, more than one process) the selection is global
over the ranks' general batches and every rank ends with the same ``.grad``: see
``drpost.distributed``. Without it no collective runs and nothing changes.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .. import distributed as _dist
from .. import feasible as fs
from ..batch import check_batch, merge_batches, require_supervised, row_losses
from ..group import LayerGroup, ScoringConfig, add_into
from ..layers import Factors, RowRestrictedRule, is_norm, scored_rule_for, unscored_rule_for
from .options import DrPostOptions, overrides_of

_CONTAINERS = (torch.nn.ParameterDict, torch.nn.ParameterList)


class NonFiniteError(FloatingPointError):
    """A loss, score or target gradient was NaN or infinite."""


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


class _Use:
    __slots__ = ("group", "rule", "state")

    def __init__(self, group, rule, state=None):
        self.group, self.rule, self.state = group, rule, state


class _Tap(torch.autograd.Function):
    """Identity on the module's output in forward; in backward, the rule's input gradient plus a
    call into the engine with the factors. Parameters are inputs so that backward always runs,
    but their gradient is returned as None: the engine assembles it."""

    @staticmethod
    def forward(ctx, engine, use, a, *params):
        ctx.engine, ctx.use, ctx.n_params = engine, use, len(params)
        ctx.save_for_backward(a)
        out, engine._pending_output = engine._pending_output, None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (a,) = ctx.saved_tensors
        grad_a = ctx.engine._backward_use(ctx.use, a, grad_out, ctx.needs_input_grad[2])
        return (None, None, grad_a) + (None,) * ctx.n_params


class DataRegularizer:
    """Data-regularized post-training on any ``nn.Module`` language model.

    The general batch builds a feasible set of update directions; the target batch defines the
    target gradient g_T; every step follows the member of the feasible set most aligned with g_T.

    Args:
        model: a causal LM; ``model(input_ids=..., attention_mask=...)`` returns logits (or an object
            with ``.logits``). Trainable ``nn.Linear``/GPT-2 ``Conv1D``/``nn.Embedding`` modules are
            scored (PEFT LoRA adapters are such Linears); other leaf modules with trainable
            parameters (norms) are trained on all general rows.
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
        if _dist.is_fsdp(model):
            raise ValueError(_dist.FSDP_UNSUPPORTED)
        self.options = opts = overrides_of(options, **overrides)
        self.sketch_kind, self.sketch_k1, self.sketch_k2 = opts.sketch_spec
        self.model, self.feasible_set, self.frac, self.scoring = model, opts.feasible_set, opts.frac, opts.scoring
        self.target_strategy, self.score_norm, self.seed = opts.target_strategy, opts.score_norm, opts.seed
        self.scope = opts.decision_scope
        self.greedy_lr, self.refresh_every, self.nonfinite = opts.greedy_lr, opts.refresh_every, opts.nonfinite
        self.loss_fn, self.direct_max_bytes = loss_fn, opts.direct_max_mb * 2 ** 20
        self.pad_token_id = pad_token_id if pad_token_id is not None else \
            (getattr(getattr(model, "config", None), "pad_token_id", None) or 0)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._scoring_cfg = ScoringConfig(self.scoring, self.sketch_kind, self.sketch_k1, self.sketch_k2, self.seed,
                                          self.direct_max_bytes, self.score_norm,
                                          target_factors=self.target_strategy == "merged"
                                          or self.scoring == "pairwise_ghost")

        self._mode = None               # None (hooks idle) | "merged" | "capture" | "general"
        self._rows = 0                  # rows of the batch in the current forward
        self._pending_output = None
        self._handles: list = []
        self._groups: list[LayerGroup] = []
        self._row_rules: list[RowRestrictedRule] = []
        self._plain_params: list[torch.nn.Parameter] = []   # everything not in a scored group
        self._plain_acc: dict = {}
        self._plain_tokens = None
        self._retained: list = []       # global scope: (group, parts, normalised scores, gram)
        self._skip = False
        self._steps_since_capture = None
        self._stats = None
        self.steps_finalized = 0         # optimisation steps finished by this regularizer (error messages)
        self.last_scores: dict = {}
        self.last_masks: dict = {}
        self.last_global_scores = None   # global scope: summed (normalised) scores and the one subset
        self.last_global_mask = None
        self._target_loss = None
        self.layer_backends: dict = {}
        self.profiler = None             # a drpost.profiling.PhaseTimer: per-phase wall time (drpost bench)
        self._warned: set = set()
        self._bad_loss = None            # distributed: what non-finite loss this rank saw (decided at finalize)
        self._tags_ok = None             # distributed: did every score gather pair the same layers?
        self._attach()
        self._dist = _dist.resolve(process_group, distributed, _model_device(model))
        if self._dist is not None:
            try:
                self._check_distributed()
            except BaseException:
                self.detach()
                raise

    # ------------------------------------------------------------------ attach / detach
    def _uses_hooks(self) -> bool:
        return self.feasible_set not in ("standard", "target_only")

    def _attach(self) -> None:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable layer (every parameter has requires_grad=False): "
                             "nothing to post-train")
        self._trainable = trainable
        if self._uses_hooks() and _checkpointing(self.model):
            raise ValueError("gradient checkpointing re-runs forward inside backward, which drpost's "
                             "per-layer hooks do not support yet; call model.gradient_checkpointing_disable() "
                             "or use feasible_set='standard'")
        if not self._uses_hooks():
            self._plain_params = trainable
            return
        group_of: dict[int, LayerGroup] = {}
        row_params: set[int] = set()
        for name, module in self.model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = scored_rule_for(module)
            if rule is not None:
                groups = {id(group_of[id(p)]): group_of[id(p)] for p in own if id(p) in group_of}
                group = next(iter(groups.values())) if groups else LayerGroup(len(self._groups))
                if len(groups) > 1:
                    raise ValueError(f"{name} shares parameters with several scored layers; not supported")
                if not groups:
                    self._groups.append(group)
                group.names.append(name)
                group.rules.append(rule)
                for p in own:
                    if id(p) not in group_of:
                        group_of[id(p)] = group
                        group.params.append(p)
                self._handles.append(module.register_forward_hook(self._make_scored_hook(group, rule), with_kwargs=True))
            elif not isinstance(module, _CONTAINERS) and unscored_rule_for(module) is not None:
                if any(id(p) in group_of for p in own):
                    raise ValueError(f"{name} shares a parameter with a scored layer; not supported")
                rrule = RowRestrictedRule(module)
                self._row_rules.append(rrule)
                row_params.update(id(p) for p in own)
                self._handles.append(module.register_forward_hook(self._make_row_hook(rrule), with_kwargs=True))
                if not is_norm(module):
                    self._warn(f"drpost: {name} ({type(module).__name__}) is not a scored layer type; its "
                               "parameters get the plain general-batch gradient (no selection)")
        if not self._groups:
            self.detach()
            raise ValueError("the model has no supported layer with trainable parameters: drpost scores "
                             "nn.Linear, GPT-2 Conv1D, nn.Embedding and PEFT LoRA adapters; unfreeze one of "
                             "them or use feasible_set='standard'")
        scored = {id(p) for g in self._groups for p in g.params}
        self._plain_params = [p for p in trainable if id(p) not in scored]
        uncovered = [n for n, p in self.model.named_parameters() if p.requires_grad
                     and id(p) not in scored and id(p) not in row_params]
        if uncovered:
            if self.target_strategy == "merged":
                self.detach()
                raise ValueError(f"parameters {uncovered} belong to no layer rule, so the merged strategy "
                                 "cannot keep the target rows out of their gradient; use "
                                 "target_strategy='separate' (they then get the plain general-batch gradient)")
            self._warn(f"drpost: parameters {uncovered} are not covered by a layer rule; they get the "
                       "plain general-batch gradient (no selection)")

    def _check_distributed(self) -> None:
        """Same configuration on every rank (one all-gather of field hashes), then what the
        distributed mode does not support."""
        digest = _dist.short_digest
        scored = [(g.name, [tuple(p.shape) for p in g.params]) for g in self._groups]
        params = [(tuple(p.shape), str(p.dtype)) for p in self._trainable]
        _dist.check_same_config(self._dist, {
            **self.options.fingerprint(), "pad_token_id": self.pad_token_id,
            "loss_fn": None if self.loss_fn is None else "custom",
            "scored_layers": f"{len(scored)} (shapes {digest(scored)})",
            "trainable_parameters": f"{len(params)} (shapes/dtypes {digest(params)})"})
        if self.feasible_set == "greedy":
            raise ValueError("feasible_set='greedy' is not supported with several processes: its Gram matrix "
                             "needs the inner products of samples held by different ranks; use layerwise/"
                             "global/filter/rowwise/random, or run greedy in one process")

    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, stacklevel=3)

    def attach(self) -> None:
        """Put the hooks back after :meth:`detach` (a no-op while attached). The groups are rebuilt
        from the model's current trainable parameters; the selection RNG is kept. A cached target
        gradient (``target_strategy="separate"``) lived in the old groups: the next step recaptures it."""
        if self._handles or not self._uses_hooks():
            return
        self._groups, self._row_rules = [], []
        self._steps_since_capture = None
        self._attach()

    def detach(self) -> None:
        """Remove every hook: the model is exactly as before attach."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._mode = None

    @property
    def groups(self) -> list[str]:
        return [g.name for g in self._groups]

    @property
    def last_selection(self) -> dict:
        """{layer: LongTensor of chosen general-sample indices} (forces a host sync; not for rowwise)."""
        return {k: m.nonzero().flatten() for k, m in self.last_masks.items() if m.dim() == 1}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything that makes the next steps reproducible: the generator of the ``random``
        feasible set and, with the separate strategy, the cached target gradient and its age."""
        caches = {}
        for g in self._groups:
            if g.cache is None:
                continue
            kind, rep = g.cache["kind"], g.cache["repr"]
            if kind == "pairwise_ghost":
                rep = [(g.rules.index(r), f.a, f.d) for r, f in rep]
            elif kind == "sketch":
                rep = {[id(r) for r in g.rules].index(k): v for k, v in rep.items()}
            else:
                rep = {g.params.index(p): v for p, v in rep.items()}
            caches[g.name] = {"kind": kind, "repr": rep}
        return {"generator": self._generator.get_state(), "steps_since_capture": self._steps_since_capture,
                "target_caches": caches, "tokens_target_total": getattr(self, "_tokens_target_total", None),
                "target_loss": self._target_loss, "sketch_seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        self._steps_since_capture = state.get("steps_since_capture")
        self._target_loss = state.get("target_loss")
        if state.get("tokens_target_total") is not None:
            self._tokens_target_total = state["tokens_target_total"]
        by_name = {g.name: g for g in self._groups}
        for name, c in state.get("target_caches", {}).items():
            if name not in by_name:
                raise ValueError(f"checkpointed target gradient for layer {name!r}, which this model lacks")
            g, kind, rep = by_name[name], c["kind"], c["repr"]
            if kind == "pairwise_ghost":
                rep = [(g.rules[i], Factors(a, d)) for i, a, d in rep]
            elif kind == "sketch":
                rep = {id(g.rules[i]): v for i, v in rep.items()}
            else:
                rep = {g.params[i]: v for i, v in rep.items()}
            g.cache = {"kind": kind, "repr": rep}

    # ------------------------------------------------------------------ hooks
    def _make_scored_hook(self, group: LayerGroup, rule):
        def hook(module, args, kwargs, output):
            if self._mode is None:
                return None
            group.calls += 1
            a = rule.capture_input(args, kwargs)
            out = output.detach()
            if a.shape[0] == 1 and self._rows > 1:
                if rule.kind != "embedding":
                    raise ValueError(f"{group.name} was called with one row in a batch of {self._rows}: "
                                     "per-sample gradients cannot be separated from a broadcast input")
                # position embeddings indexed by [1, T] ids and broadcast over the batch: make the
                # broadcast explicit so that every row's output gradient is seen separately
                a = a.expand(self._rows, *a.shape[1:])
                out = out.expand(self._rows, *out.shape[1:]).contiguous()
            self._pending_output = out
            return _Tap.apply(self, _Use(group, rule), a, *rule.params)
        return hook

    def _make_row_hook(self, rule: RowRestrictedRule):
        def hook(module, args, kwargs, output):
            if self._mode != "merged":
                return None   # separate strategy: plain autograd, target pass does not reach .grad
            x = rule.capture_input(args, kwargs)
            if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
                raise ValueError(f"{type(module).__name__} has trainable parameters but does not map one "
                                 "tensor to one tensor, so drpost cannot keep target rows out of its "
                                 "gradient; use target_strategy='separate' or freeze it")
            dev = x.device.type
            state = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            self._pending_output = output.detach()
            return _Tap.apply(self, _Use(None, rule, state), x, *rule.params)
        return hook

    def _backward_use(self, use: _Use, a, d, need_input_grad: bool):
        if use.group is None:   # row-restricted (norm) layer in a merged batch
            with self._phase("norm_rules"):
                grad_x, grads = use.rule.backward(a, d, use.state, self._n_general)
                with torch.no_grad():
                    for p, g in grads.items():
                        add_into(self._plain_acc, p, g)
            return grad_x if need_input_grad else None
        grad_a = use.rule.input_grad(a, d) if need_input_grad else None
        with torch.no_grad():
            f = use.rule.factors(a, d)
            self._on_factors(use.group, use.rule, f)
        return grad_a

    def _phase(self, name: str):
        return nullcontext() if self.profiler is None else self.profiler.phase(name)

    # ------------------------------------------------------------------ per-layer work
    def _on_factors(self, group: LayerGroup, rule, f: Factors) -> None:
        if self._mode == "capture":
            group.pending.append((rule, None, f))
            if len(group.pending) == group.calls:
                self._capture_group(group)
            return
        if self._mode == "merged":
            b = self._n_general
            group.pending.append((rule, f.rows(slice(0, b)), f.rows(slice(b, None))))
        else:
            group.pending.append((rule, f, None))
        if len(group.pending) == group.calls:
            self._process_group(group)

    def _shape(self, s: int):
        b, v = self._n_general, self._n_target
        return b, v, s, fs.num_selected(max(b, 1), self.frac)

    def _capture_group(self, group: LayerGroup) -> None:
        parts = group.take_pending()
        backend = group.backend(self._scoring_cfg, parts[0][0], *self._shape(parts[0][2].a.shape[1]))
        with self._phase("target_capture"):
            group.capture(self._scoring_cfg, parts, backend, self.feasible_set == "rowwise")

    def _process_group(self, group: LayerGroup) -> None:
        """All backward calls of a group are in: score, then choose (or wait for the global choice)."""
        cfg, parts = self._scoring_cfg, group.take_pending()
        rows = self.feasible_set == "rowwise"
        shape = self._shape(parts[0][1].a.shape[1])
        with self._phase("scoring"):
            if self._mode == "merged":
                backend = group.backend(cfg, parts[0][0], *shape)
                target = group.target_repr(cfg, parts, backend, rows)
            else:
                backend, target = group.cached_target(cfg, parts[0][0], *shape)
            self.layer_backends[group.name] = backend
            raw, per_sample = group.scores(cfg, parts, target, backend, rows)
            scores = raw / self._tokens_target_total
            self.last_scores[group.name] = scores
            flag = ~torch.isfinite(scores).all()
            group.bad = flag if group.bad is None else (group.bad | flag)
            normed = group.normalise(cfg, parts, scores, target, backend, rows, self._tokens_general,
                                     self._tokens_target_total)
            gram = group.gram(cfg, parts, backend) if self.feasible_set == "greedy" else None
        if self.scope == "global":
            self._retained.append((group, parts, normed, gram, per_sample))
            return
        with self._phase("selection"):
            mask, full_mask = self._choose(normed, gram, group.index)
        self._assemble(group, parts, mask, per_sample, full_mask)

    def _choose(self, scores, gram, tag: int):
        """(mask of this process's samples, mask over every rank's samples or None).

        Distributed: the scores of every rank are all-gathered in rank order and the feasible set
        is applied to the concatenation as one process would; this rank keeps its slice. ``random``
        needs no scores: every rank's generator is in the same state and draws the same mask."""
        if self._dist is None:
            return self._select(scores, gram, self._tokens_general), None
        ctx, b = self._dist, scores.shape[0]
        if self.feasible_set == "random":
            full = scores.new_empty((ctx.world * b,) + tuple(scores.shape[1:]))
        else:
            full, ok = _dist.gather_scores(ctx, scores, tag)
            self._tags_ok = ok if self._tags_ok is None else self._tags_ok & ok
        full_mask = self._select(full, None, None).to(scores.device)
        return ctx.local_rows(full_mask, b), full_mask

    def _select(self, scores, gram, tokens):
        fset, b = self.feasible_set, scores.shape[0]
        k = fs.num_selected(b, self.frac)
        if fset in ("layerwise", "global", "rowwise"):
            return fs.topk_mask(scores, k)
        if fset == "filter":
            return fs.filter_mask(scores, self.frac)
        if fset == "greedy":
            return fs.greedy_mask(scores, gram, k, self.greedy_lr)
        if fset == "random":
            return fs.random_mask(scores.shape, k, self._generator).to(scores.device)
        raise AssertionError(fset)

    def _assemble(self, group, parts, mask, per_sample=None, full_mask=None):
        with self._phase("weight_grad"):
            self._assemble_chosen(group, parts, mask, per_sample, full_mask)

    def _assemble_chosen(self, group, parts, mask, per_sample=None, full_mask=None):
        """The chosen samples' gradient of one group (summed into its accumulator). ``full_mask``
        (distributed) is the mask over every rank's samples: this rank's share of a global top-k
        has no fixed size, so the chosen rows are weighted instead of gathered."""
        self.last_masks[group.name] = mask
        tokens = self._tokens_general
        shown = mask if full_mask is None else full_mask
        k = self._fixed_k(mask) if full_mask is None else None
        idx = None
        weights = mask.to(tokens.dtype)
        if k is not None:
            # a top-k set has a known size: gather its rows without a host sync
            idx = torch.sort(mask.to(torch.uint8), descending=True, stable=True).indices[:k]
        elif shown.dim() == 1 and self.feasible_set in ("layerwise", "global", "greedy", "random") and \
                fs.num_selected(shown.shape[0], self.frac) == shown.shape[0]:
            weights = None     # k == B: every sample
        count = group.accumulate(parts, weights, idx, per_sample, tokens)
        # distributed: the number chosen over all ranks (known from the gathered mask); tokens are this rank's
        self._stats.selected[group.name] = shown.sum() if shown.dim() == 1 else shown.sum(0).float().mean()
        self._stats.selected_tokens[group.name] = count

    def _fixed_k(self, mask):
        """The number of chosen samples when it is known without looking at the mask."""
        if mask.dim() != 1 or self.feasible_set not in ("layerwise", "global", "greedy", "random"):
            return None
        k = fs.num_selected(mask.shape[0], self.frac)
        return None if k == mask.shape[0] else k

    def _flush_pending(self) -> None:
        """Groups whose every forward call did not reach the loss (e.g. a module called twice with
        one output unused) are processed with the calls that did."""
        for group in self._groups:
            if group.pending:
                group.calls = len(group.pending)
                if self._mode == "capture":
                    self._capture_group(group)
                else:
                    self._process_group(group)

    def _finish_global(self) -> None:
        self._flush_pending()
        retained, self._retained = self._retained, []
        if not retained:
            return
        total = sum(r[2] for r in retained)
        gram = sum(r[3] for r in retained) if self.feasible_set == "greedy" else None
        self.last_global_scores = total
        with self._phase("selection"):
            mask, full_mask = self._choose(total, gram, -1)
        for group, parts, _, _, per_sample in retained:
            self._assemble(group, parts, mask, per_sample, full_mask)
        self.last_global_mask = mask

    # ------------------------------------------------------------------ the step
    def backward(self, general_batch: dict, target_batch: dict | None = None, *, finalize: bool = True) -> StepStats:
        """One (micro-)step: fill ``p.grad`` like ``loss.backward()`` would.

        With ``finalize=False`` the chosen gradients of this micro-batch are held back and added
        to the next calls'; the call with ``finalize=True`` normalises the whole accumulated step
        by the chosen samples' token counts and writes ``.grad``."""
        device = _model_device(self.model)
        general = check_batch(general_batch, "general", device)
        stats = self._stats = StepStats()     # this call's (micro-batch's) statistics
        fset = self.feasible_set
        needs_target = fset != "standard" and (self.target_strategy == "merged" or fset == "target_only"
                                               or self._steps_since_capture is None
                                               or self._steps_since_capture >= self.refresh_every)
        target = None
        if target_batch is not None:
            target = check_batch(target_batch, "target", device)
        elif needs_target and self._dist is None:   # distributed: a rank may hold no target rows
            raise ValueError("a target batch is required for this step (feasible_set="
                             f"{fset!r}, target_strategy={self.target_strategy!r}): pass target_batch")
        try:
            if fset in ("standard", "target_only"):
                self._plain_step(general, target)
            else:
                if self._dist is not None:
                    target = self._exchange(general, target, needs_target)
                if self.target_strategy == "merged":
                    self._merged_step(general, target)
                else:
                    if needs_target:
                        self._capture(target)
                    if not self._skip:
                        self._general_step(general)
        except BaseException:
            self._mode = None
            self._reset_step()
            self._stats = None
            raise
        return stats if not finalize else self._finish_call(stats)

    def _finish_call(self, stats: StepStats) -> StepStats:
        try:
            with self._phase("assembly"):
                self._finalize()
                if not stats.skipped:
                    self._check_grads(stats)
        finally:
            self._stats = None
            self.steps_finalized += 1
        return stats

    def _where(self) -> str:
        return f"at step {self.steps_finalized + 1} of this DataRegularizer"

    def _check_grads(self, stats: StepStats) -> None:
        """The last guard before the optimizer: every gradient drpost wrote must be finite (a loss
        and scores can be finite while an accumulation overflows). One fused L2 norm (a single
        vectorised read of every gradient) and one host sync; a norm that overflowed although every
        entry is finite (|g| > ~1e19 in float32) is re-checked entry-wise before anything is refused."""
        params = [p for p in self._trainable if p.grad is not None]
        if not params:
            return
        norms = torch._foreach_norm([p.grad for p in params])
        finite = torch.stack([torch.isfinite(n).to(norms[0].device) for n in norms])
        if bool(finite.all()):
            return
        bad = [i for i in (~finite).nonzero().flatten().tolist() if not bool(torch.isfinite(params[i].grad).all())]
        if not bad:
            return
        name = self._param_name(params[bad[0]])
        for p in self._trainable:
            p.grad = None
        if self.nonfinite == "error":
            raise NonFiniteError(f"non-finite gradient of {name} {self._where()} (loss and scores were finite: an "
                                 "overflow while assembling the update); lower the learning rate or use float32 / "
                                 "bf16 instead of float16, or pass nonfinite='skip' to drop such steps")
        stats.skipped = True

    def _param_name(self, param) -> str:
        for n, p in self.model.named_parameters():
            if p is param:
                return n
        return "a parameter"

    def _exchange(self, general: dict, target: dict | None, needs_target: bool) -> dict | None:
        """Distributed, before the forward: check that every rank has B general rows and, when this
        step needs the target, all-gather every rank's target rows so that each rank holds the
        whole target batch (one collective for the sizes, one for the rows)."""
        ctx, b = self._dist, general["input_ids"].shape[0]
        if needs_target:
            full, extra = _dist.gather_rows(ctx, target, self.pad_token_id, extra=(b,))
            sizes = extra[:, 0].tolist()
        else:
            full, sizes = None, ctx.all_gather(torch.tensor([b], device=ctx.device)).tolist()
        _dist.check_same_batch_size(ctx, sizes)
        if target is not None and target.keys() - set(_dist._KEYS):
            self._warn(f"drpost: distributed steps gather only input_ids/attention_mask/labels of the target "
                       f"batch; {sorted(target.keys() - set(_dist._KEYS))} are dropped")
        if not needs_target:
            return target
        if full is None:
            raise ValueError("a target batch is required for this step (feasible_set="
                             f"{self.feasible_set!r}, target_strategy={self.target_strategy!r}) but no rank "
                             "passed target rows")
        return check_batch(full, "target", _model_device(self.model))

    def _forward_losses(self, batch: dict, mode):
        self._mode = mode
        self._rows = batch["input_ids"].shape[0]
        for g in self._groups:
            g.calls, g.pending = 0, []
        with self._phase("forward"):
            sums, tokens = row_losses(self.model, batch, self.loss_fn)
        return sums, tokens

    def _check_loss(self, loss: torch.Tensor, what: str) -> bool:
        if bool(torch.isfinite(loss)):
            return True
        if self._dist is not None:
            # the other ranks are about to enter this backward's collectives: go on, and let
            # finalize drop (or refuse) the step on every rank
            self._bad_loss = self._bad_loss or what
            return True
        if self.nonfinite == "error":
            raise NonFiniteError(f"non-finite {what} loss ({float(loss.detach())}) {self._where()}; check the "
                                 "learning rate, the data and the precision, or pass nonfinite='skip' to drop such "
                                 "steps")
        self._skip = True
        return False

    def _accumulate_tokens(self, attr: str, value: torch.Tensor) -> None:
        old = getattr(self, attr)
        setattr(self, attr, value if old is None else old + value)

    def _stash_plain(self):
        old = {p: p.grad for p in self._plain_params}
        for p in self._plain_params:
            p.grad = None
        return old

    def _collect_plain(self, old):
        for p in self._plain_params:
            g, p.grad = p.grad, old[p]
            if g is not None:
                add_into(self._plain_acc, p, g)

    def _plain_step(self, general, target):
        """standard (general rows) or target_only (target rows): ordinary autograd, token sums."""
        train, other = (general, target) if self.feasible_set == "standard" else (target, general)
        self._mode = None
        stats = self._stats
        if train is None:          # distributed target_only: no target rows on this rank
            with torch.no_grad():
                gs, gt = row_losses(self.model, other, self.loss_fn)
            stats.add("general", gs.sum(), gt.sum())
            return
        with self._phase("forward"):
            sums, tokens = row_losses(self.model, train, self.loss_fn)
        if self._dist is None:     # distributed: checked on the tokens of all ranks at finalize
            require_supervised(tokens, "general" if train is general else "target")
        loss = sums.sum()
        t_total = tokens.sum()
        if self.feasible_set == "standard":
            stats.add("general", loss.detach(), t_total)
        else:
            stats.add("target", loss.detach(), t_total)
            with torch.no_grad():
                gs, gt = row_losses(self.model, other, self.loss_fn)
            stats.add("general", gs.sum(), gt.sum())
        if not self._check_loss(loss, "training"):
            return
        old = self._stash_plain()
        with self._phase("backward"):
            loss.backward()
        self._collect_plain(old)
        self._accumulate_tokens("_plain_tokens", t_total)

    def _merged_step(self, general, target):
        b = general["input_ids"].shape[0]
        merged = merge_batches(general, target, self.pad_token_id)
        self._n_general, self._n_target = b, target["input_ids"].shape[0]
        sums, tokens = self._forward_losses(merged, "merged")
        try:
            self._set_step_tokens(sums, tokens, b)
            self._backward_pass(sums.sum(), "general+target")
        finally:
            self._mode = None

    def _backward_pass(self, loss: torch.Tensor, what: str) -> None:
        """The one backward of a selecting step: hooks score and choose; plain params collected."""
        if not self._check_loss(loss, what):
            return
        old = self._stash_plain()
        with self._phase("backward"):
            loss.backward()
        self._collect_plain(old)
        self._finish_global()

    def _set_step_tokens(self, sums, tokens, b):
        self._tokens_general = tokens[:b]
        t_gen = tokens[:b].sum()
        stats = self._stats
        stats.add("general", sums[:b].detach().sum(), t_gen)
        if tokens.shape[0] > b:
            t_tgt = tokens[b:].sum()
            self._tokens_target_total = t_tgt
            stats.add("target", sums[b:].detach().sum(), t_tgt)
            require_supervised(t_tgt, "target")
        if self._dist is None:     # distributed: checked on the tokens of all ranks at finalize
            require_supervised(t_gen, "general")
        self._accumulate_tokens("_plain_tokens", t_gen)

    def capture_target(self, target_batch: dict | None, chunk_size: int | None = None) -> None:
        """Separate strategy: compute and cache the per-layer target gradient (raw sums), from the
        whole target batch, in chunks of ``chunk_size`` rows if given (chunks are summed).
        Distributed: each rank passes its slice (or None); the slices are gathered first."""
        if self.target_strategy != "separate":
            raise ValueError("capture_target is for target_strategy='separate'")
        device = _model_device(self.model)
        target = check_batch(target_batch, "target", device) if target_batch is not None or self._dist is None \
            else None
        if self._dist is not None:      # every rank captures the whole target batch
            target, _ = _dist.gather_rows(self._dist, target, self.pad_token_id)
            if target is None:
                raise ValueError("capture_target: no rank passed target rows")
            target = check_batch(target, "target", device)
        self._capture(target, chunk_size)

    def _capture(self, target: dict, chunk_size: int | None = None) -> None:
        for g in self._groups:
            g.cache = None
        n = target["input_ids"].shape[0]
        step = chunk_size or n
        total_tokens, total_loss = None, None
        params = [p for g in self._groups for p in g.params]
        self._n_general, self._n_target = 0, n
        try:
            for start in range(0, n, step):
                chunk = {k: (v[start:start + step] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n
                             else v) for k, v in target.items()}
                sums, tokens = self._forward_losses(chunk, "capture")
                loss = sums.sum()
                if not self._check_loss(loss, "target"):
                    return
                torch.autograd.grad(loss, params, allow_unused=True)
                self._flush_pending()
                total_tokens = tokens.sum() if total_tokens is None else total_tokens + tokens.sum()
                total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
        finally:
            self._mode = None
        require_supervised(total_tokens, "target")
        self._tokens_target_total = total_tokens
        self._target_loss = total_loss / total_tokens
        self._steps_since_capture = 0
        for g in self._groups:
            if g.cache is not None:
                reprs = g.cache["repr"]
                vals = reprs.values() if isinstance(reprs, dict) else []
                for t in vals:
                    flag = ~torch.isfinite(t).all()
                    g.bad = flag if g.bad is None else g.bad | flag

    def _general_step(self, general):
        b = general["input_ids"].shape[0]
        self._n_general, self._n_target = b, 0
        sums, tokens = self._forward_losses(general, "general")
        try:
            self._set_step_tokens(sums, tokens, b)
            self._stats.add("target", self._target_loss * self._tokens_target_total, self._tokens_target_total)
            self._backward_pass(sums.sum(), "general")
        finally:
            self._mode = None

    def _finalize(self) -> None:
        if self._dist is not None:
            return self._finalize_distributed()
        stats = self._stats
        bad = [g for g in self._groups if g.bad is not None]
        if not self._skip and bad:
            flags = torch.stack([g.bad for g in bad])
            if bool(flags.any()):
                first = bad[int(flags.nonzero()[0, 0])]
                if self.nonfinite == "error":
                    self._reset_step()
                    raise NonFiniteError(f"non-finite scores or target gradient in layer {first.name} "
                                         f"{self._where()}; pass nonfinite='skip' to drop such steps")
                self._skip = True
        if self._skip:
            for p in self._trainable:
                p.grad = None
            stats.skipped = True
            self._reset_step()
            return
        for group in self._groups:
            if group.count is None:
                continue
            for p, acc in group.acc.items():  # the accumulators are drpost's own: divide in place
                _add_grad(p, acc.div_(group.rows_broadcast(p, group.count.clamp_min(1).to(acc.dtype))))
        if self._plain_acc:
            denom = self._plain_tokens.clamp_min(1)
            for p, acc in self._plain_acc.items():
                _add_grad(p, acc.div_(denom.to(acc.dtype)))
        if self.target_strategy == "separate" and self._steps_since_capture is not None:
            self._steps_since_capture += 1
        self._reset_step()

    def _finalize_distributed(self) -> None:
        """Distributed ``_finalize``: one small all-reduce of [non-finite flag per rank, plain tokens,
        chosen-token counts of every group, has-gradient flag per trainable parameter]; then the raw
        chosen gradients are summed over the ranks (bucketed) and divided by the global counts, so
        every rank writes the same ``.grad``."""
        ctx, stats = self._dist, self._stats
        groups = [g for g in self._groups if g.count is not None]
        dev = ctx.device
        bad = any(g.bad is not None for g in self._groups) and \
            bool(torch.stack([g.bad for g in self._groups if g.bad is not None]).any())
        flags = torch.zeros(ctx.world, dtype=torch.float64, device=dev)
        flags[ctx.rank] = float(bad or self._bad_loss is not None)
        source = {p: acc for g in groups for p, acc in g.acc.items()}
        source.update(self._plain_acc)
        has = torch.tensor([float(p in source) for p in self._trainable], dtype=torch.float64, device=dev)
        plain = self._plain_tokens if self._plain_tokens is not None else torch.zeros((), device=dev)
        meta = torch.cat([flags, plain.reshape(1).to(dev, torch.float64)] +
                         [g.count.reshape(-1).to(dev, torch.float64) for g in groups] + [has])
        ctx.all_reduce(meta)
        try:
            _dist.check_tags(self._tags_ok)
        except RuntimeError:
            self._reset_step()
            raise
        flags, plain, rest = meta[:ctx.world], meta[ctx.world], meta[ctx.world + 1:]
        bad_ranks = flags.nonzero().flatten().tolist()
        if bad_ranks:
            what = f"non-finite loss, scores or target gradient on rank(s) {bad_ranks}"
            if self.nonfinite == "error":
                self._reset_step()
                raise NonFiniteError(f"{what} {self._where()}; pass nonfinite='skip' to drop such steps")
            for p in self._trainable:
                p.grad = None
            stats.skipped = True
            if self.target_strategy == "separate":
                self._steps_since_capture = None   # the cached target may be the bad part: recapture
            self._reset_step()
            return
        if float(plain) <= 0:
            self._reset_step()
            role = "target" if self.feasible_set == "target_only" else "general"
            raise ValueError(f"the {role} batches of all {ctx.world} ranks have no supervised tokens: every label "
                             "is -100; check the chat template / label masking and truncation")
        for g in groups:                           # global chosen-token counts
            n = g.count.numel()
            g.count, rest = rest[:n].view_as(g.count).to(g.count.dtype), rest[n:]
        present = rest > 0
        grads = []
        for p, keep in zip(self._trainable, present.tolist()):
            if keep:
                acc = source.get(p)
                if acc is None or not acc.is_contiguous():
                    acc = torch.zeros_like(p, memory_format=torch.contiguous_format) if acc is None \
                        else acc.contiguous()
                    source[p] = acc
                grads.append(acc)
        _dist.all_reduce_tensors(ctx, grads)
        group_of = {p: g for g in groups for p in g.params}
        for p, keep in zip(self._trainable, present.tolist()):
            if not keep:
                continue
            acc, g = source[p], group_of.get(p)
            if g is not None:
                _add_grad(p, acc.div_(g.rows_broadcast(p, g.count.clamp_min(1).to(acc.dtype))))
            else:
                _add_grad(p, acc.div_(plain.clamp_min(1).to(acc.dtype)))
        if self.target_strategy == "separate" and self._steps_since_capture is not None:
            self._steps_since_capture += 1
        self._reset_step()

    def _reset_step(self) -> None:
        for g in self._groups:
            g.reset()
        self._plain_acc, self._plain_tokens, self._skip, self._retained = {}, None, False, []
        self._bad_loss, self._tags_ok = None, None


def _add_grad(p: torch.nn.Parameter, g: torch.Tensor) -> None:
    """``p.grad += g`` as autograd would: take ``g`` itself when ``p`` has no gradient yet."""
    if p.grad is None:
        p.grad = g
    else:
        p.grad = p.grad + g


def _checkpointing(model: torch.nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):   # transformers 5, 4
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
