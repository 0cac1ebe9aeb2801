"""Reduction: where one process and several processes differ, behind one interface.

:class:`LocalReduction` (one process) and :class:`DistributedReduction` (``torchrun``: one
global, symmetric selection over every rank's general batch; see :mod:`drpost.distributed`)
answer the same questions at the same points of a step:

* before the forward: is a target batch required (:meth:`require_target`), whose rows does every
  rank forward (:meth:`exchange`, :meth:`capture_rows`);
* during it: may a batch without supervised tokens or a non-finite loss stop here
  (:meth:`require_supervised`, :meth:`check_loss`; distributed, both wait for finalize so that
  every rank runs the same collectives);
* per decision: which samples are chosen (:meth:`choose`);
* once a group's accumulator is final (:meth:`on_assembled`; distributed, in the finalize call,
  its all-reduce is launched then, overlapped with the rest of the backward: :mod:`.overlap`);
* at the end: the division by the chosen-token counts and the ``.grad`` writes (:meth:`finalize`).

Nothing outside this module branches on "distributed". An FSDP2-sharded model gets the third
reduction, :class:`drpost.engine.reduce_fsdp.ShardedReduction` (gradients reduce-scattered to shards).
"""
from __future__ import annotations

import torch

from .. import distributed as _dist
from ..batch import check_batch, require_supervised
from .guards import NonFiniteError
from .overlap import ALONE_BYTES, DDP_BUCKET_BYTES, GradientBuckets


class LocalReduction:
    distributed = False

    def check_ranks(self, fingerprint: dict, options) -> None:
        """Distributed: every rank has the same options and layers (one process: nothing to do)."""

    def fault_of(self, err: BaseException):
        """The error to raise instead of ``err`` when it is a collective run by someone else (FSDP's)
        failing because another rank died; None to let ``err`` through."""
        return None

    # ------------------------------------------------------------------ before the forward
    def require_target(self, target, needs_target: bool, options) -> None:
        if target is None and needs_target:
            raise ValueError("a target batch is required for this step (feasible_set="
                             f"{options.feasible_set!r}, target_strategy={options.target_strategy!r}): "
                             "pass target_batch")

    def exchange(self, general: dict, target: dict | None, needs_target: bool, options) -> dict | None:
        return target

    def capture_rows(self, target_batch, device) -> dict:
        return check_batch(target_batch, "target", device)

    # ------------------------------------------------------------------ during the forward
    def require_supervised(self, tokens: torch.Tensor, role: str) -> None:
        require_supervised(tokens, role)

    def check_loss(self, step, loss: torch.Tensor, what: str, options, where: str) -> bool:
        """False when the pass must stop here (a non-finite loss with nonfinite='skip')."""
        if bool(torch.isfinite(loss)):
            return True
        if options.nonfinite == "error":
            raise NonFiniteError(f"non-finite {what} loss ({float(loss.detach())}) {where}; check the learning "
                                 "rate, the data and the precision, or pass nonfinite='skip' to drop such steps")
        step.skip = True
        return False

    # ------------------------------------------------------------------ per decision
    def on_assembled(self, pipeline, group) -> None:
        """A group's accumulator is final for this call (distributed: its all-reduce may start)."""

    # per-layer decisions that may wait, unresolved, while the backward goes on (distributed: their
    # score gathers in flight); one process decides at once
    decision_window = 0

    def start_choice(self, pipeline, scores: torch.Tensor, gram, tag: int):
        """A callable that returns :meth:`choose`'s answer; it may finish later (distributed)."""
        mask = pipeline.select(scores, gram)
        return lambda: (mask, None)

    def choose(self, pipeline, scores: torch.Tensor, gram, tag: int):
        """(mask of this process's samples, mask over every rank's samples or None)."""
        return self.start_choice(pipeline, scores, gram, tag)()

    # ------------------------------------------------------------------ the end of the step
    def finalize(self, pipeline, att, where: str) -> None:
        step, options = pipeline.step, pipeline.options
        bad = [g for g in att.groups if g.bad is not None]
        if not step.skip and bad:
            flags = torch.stack([g.bad for g in bad])
            if bool(flags.any()):
                first = bad[int(flags.nonzero()[0, 0])]
                if options.nonfinite == "error":
                    raise NonFiniteError(f"non-finite scores or target gradient in layer {first.name} {where}; "
                                         "pass nonfinite='skip' to drop such steps")
                step.skip = True
        if step.skip:
            _drop_step(att, step)
            return
        for group in att.groups:
            if group.count is None:
                continue
            for p, acc in group.acc.items():  # the accumulators are drpost's own: divide in place
                add_grad(p, acc.div_(group.rows_broadcast(p, group.count.clamp_min(1).to(acc.dtype))))
        if step.plain_acc:
            denom = step.plain_tokens.clamp_min(1)
            for p, acc in step.plain_acc.items():
                add_grad(p, acc.div_(denom.to(acc.dtype)))
        _age_target(pipeline)


class DistributedReduction(LocalReduction):
    """Several processes: the scores are gathered for one global decision and the chosen raw
    gradients summed over the ranks, then divided by the global counts (every rank ends with the
    same ``.grad``)."""
    distributed = True

    def __init__(self, ctx: _dist.DistContext, pad_token_id: int, warn):
        self.ctx, self.pad_token_id, self.warn = ctx, pad_token_id, warn
        ctx.use_side_group()

    def check_ranks(self, fingerprint: dict, options) -> None:
        _dist.check_same_config(self.ctx, fingerprint)
        if options.feasible_set == "greedy":
            raise ValueError("feasible_set='greedy' is not supported with several processes: its Gram matrix "
                             "needs the inner products of samples held by different ranks; use layerwise/"
                             "global/filter/rowwise/random, or run greedy in one process")

    def require_target(self, target, needs_target: bool, options) -> None:
        """A rank may hold no target rows: checked on the gathered rows (:meth:`exchange`)."""

    def exchange(self, general: dict, target: dict | None, needs_target: bool, options) -> dict | None:
        """Check that every rank has B general rows and, when this step needs the target, all-gather
        every rank's target rows so that each rank holds the whole target batch (one collective for
        the sizes, one for the rows). Packed (padding-free) batches: a sample is a sequence, so the
        ranks may hold different numbers of rows and samples; the sample counts are kept for
        :meth:`choose`, and the target rows travel with their ``position_ids``."""
        ctx, b = self.ctx, general["input_ids"].shape[0]
        samples = general["_layout"].n
        packed = int(_packed(general) or _packed(target))
        if needs_target:
            full, extra = _dist.gather_rows(ctx, target, self.pad_token_id, extra=(b, samples, packed))
        else:
            full, extra = None, ctx.all_gather(torch.tensor([[b, samples, packed]], device=ctx.device)).cpu()
        if any(extra[:, 2].tolist()):
            self.sample_counts = extra[:, 1].tolist()          # may differ between ranks
        else:
            _dist.check_same_batch_size(ctx, extra[:, 0].tolist())
            self.sample_counts = None                          # b samples on every rank
        dropped = sorted(k for k in (target or {}) if k not in _dist.ROW_KEYS and not k.startswith("_"))
        if dropped:
            self.warn(f"drpost: distributed steps gather only input_ids/attention_mask/labels (position_ids of "
                      f"packed rows) of the target batch; {dropped} are dropped")
        if not needs_target:
            return target
        if full is None:
            raise ValueError("a target batch is required for this step (feasible_set="
                             f"{options.feasible_set!r}, target_strategy={options.target_strategy!r}) but no "
                             "rank passed target rows")
        return check_batch(full, "target", ctx.device)

    def capture_rows(self, target_batch, device) -> dict:
        target = check_batch(target_batch, "target", device) if target_batch is not None else None
        target, _ = _dist.gather_rows(self.ctx, target, self.pad_token_id)   # every rank captures it all
        if target is None:
            raise ValueError("capture_target: no rank passed target rows")
        return check_batch(target, "target", device)

    def require_supervised(self, tokens: torch.Tensor, role: str) -> None:
        """Checked on the tokens of every rank at finalize."""

    def check_loss(self, step, loss: torch.Tensor, what: str, options, where: str) -> bool:
        # the other ranks are about to enter this backward's collectives: go on, and let finalize
        # drop (or refuse) the step on every rank
        if not bool(torch.isfinite(loss)):
            step.bad_loss = step.bad_loss or what
        return True

    # A layer's score all-gather is launched when it is scored and waited for only when this many
    # later groups have been scored too: the backward goes on meanwhile (and keeps those groups'
    # factors), so a rank waits only for a peer that is this far behind, not at every layer.
    decision_window = 8

    def start_choice(self, pipeline, scores: torch.Tensor, gram, tag: int):
        """The scores of every rank are all-gathered in rank order and the feasible set is applied to
        the concatenation as one process would; this rank keeps its slice. The gather is launched
        now and the returned callable finishes the choice (every rank calls them in the same order).
        ``random`` needs no scores: every rank's generator is in the same state and draws the same mask."""
        ctx, b, step = self.ctx, scores.shape[0], pipeline.step
        counts = getattr(self, "sample_counts", None) or [b] * ctx.world
        start = sum(counts[:ctx.rank])
        full = pending = None
        if pipeline.options.feasible_set == "random":
            full = scores.new_empty((sum(counts),) + tuple(scores.shape[1:]))
        else:
            pending = _dist.start_gather_scores(ctx, scores, tag, counts)

        def finish():
            nonlocal full
            if pending is not None:
                full, ok = pending.result()
                step.tags_ok = ok if step.tags_ok is None else step.tags_ok & ok
            full_mask = pipeline.select(full, None).to(scores.device)
            return full_mask[start:start + b], full_mask
        return finish

    # ------------------------------------------------------------------ the gradients, overlapped
    bucket_bytes = DDP_BUCKET_BYTES  # the all-reduces' bucket size (DDP's default)
    alone_bytes = ALONE_BYTES        # a gradient this large is all-reduced by itself, in place
    on_launch = None                 # called with the parameters of every bucket launched (tests)

    def _buckets(self, step) -> GradientBuckets:
        if step.overlap is None:
            step.overlap = GradientBuckets(self.ctx, self.bucket_bytes, self.on_launch, self.alone_bytes)
        return step.overlap

    def on_assembled(self, pipeline, group) -> None:
        """In the finalize call the group's accumulators are final once assembled: launch their
        all-reduce now (zeros for a parameter this rank chose nothing for), so that it runs while
        the backward goes on; finalize only waits for it."""
        step = pipeline.step
        # (the FSDP reduction, which reduce-scatters at finalize instead, overrides this method)
        if step.finalizing:
            buckets = self._buckets(step)
            for p in group.params:
                buckets.add(p, _grad_or_zeros(group.acc, p))

    # ------------------------------------------------------------------ the end of the step
    def finalize(self, pipeline, att, where: str) -> None:
        """The small metadata all-reduce (:meth:`_reduce_metadata`: may drop the step on every
        rank), then the chosen gradients summed over the ranks (:meth:`_reduce_gradients`: most of
        it launched during the backward) and divided by the global counts."""
        meta = self._reduce_metadata(pipeline, att, where)
        if meta is None:
            return
        summed = self._reduce_gradients(pipeline, att)
        for p, keep in zip(att.trainable, meta.present):
            if not keep:
                continue
            acc, g = summed[p], meta.group_of.get(p)
            denom = g.rows_broadcast(p, g.count.clamp_min(1).to(acc.dtype)) if g is not None \
                else meta.plain.clamp_min(1).to(acc.dtype)
            add_grad(p, acc.div_(denom))
        _age_target(pipeline)

    def _reduce_metadata(self, pipeline, att, where: str):
        """One small all-reduce of [non-finite flag per rank, plain tokens, chosen-token counts of
        every group, has-gradient flag per trainable parameter]. Sets the groups' global counts and
        returns what the division needs, or None when the step is dropped (on every rank)."""
        ctx, step, options = self.ctx, pipeline.step, pipeline.options
        groups = [g for g in att.groups if g.count is not None]
        dev = ctx.device
        bad = any(g.bad is not None for g in att.groups) and \
            bool(torch.stack([g.bad for g in att.groups if g.bad is not None]).any())
        flags = torch.zeros(ctx.world, dtype=torch.float64, device=dev)
        flags[ctx.rank] = float(bad or step.bad_loss is not None)
        source = {p for g in groups for p in g.acc}
        source.update(step.plain_acc)
        has = torch.tensor([float(p in source) for p in att.trainable], dtype=torch.float64, device=dev)
        plain = step.plain_tokens if step.plain_tokens is not None else torch.zeros((), device=dev)
        meta = torch.cat([flags, plain.reshape(1).to(dev, torch.float64)] +
                         [g.count.reshape(-1).to(dev, torch.float64) for g in groups] + [has])
        ctx.all_reduce(meta)
        _dist.check_tags(step.tags_ok)
        flags, plain, rest = meta[:ctx.world], meta[ctx.world], meta[ctx.world + 1:]
        bad_ranks = flags.nonzero().flatten().tolist()
        if bad_ranks:
            self._discard_gradients(step)
            if options.nonfinite == "error":
                raise NonFiniteError(f"non-finite loss, scores or target gradient on rank(s) {bad_ranks} {where}; "
                                     "pass nonfinite='skip' to drop such steps")
            _drop_step(att, step)
            if options.target_strategy == "separate":
                pipeline.target.age = None   # the cached target may be the bad part: recapture
            return None
        if float(plain) <= 0:
            self._discard_gradients(step)
            role = "target" if options.feasible_set == "target_only" else "general"
            raise ValueError(f"the {role} batches of all {ctx.world} ranks have no supervised tokens: every label "
                             "is -100; check the chat template / label masking and truncation")
        for g in groups:                           # global chosen-token counts
            n = g.count.numel()
            g.count, rest = rest[:n].view_as(g.count).to(g.count.dtype), rest[n:]
        return _Meta(plain, (rest > 0).tolist(), {p: g for g in groups for p in g.params})

    def _reduce_gradients(self, pipeline, att) -> dict:
        """Every trainable parameter's raw chosen gradient summed over the ranks (parameter ->
        tensor). The groups assembled in this call were launched during the backward
        (:meth:`on_assembled`); the plain parameters (and any group not assembled) are final only
        now: launched here, in ``att.trainable`` order; then everything is waited for."""
        step = pipeline.step
        buckets = self._buckets(step)
        source = dict(step.plain_acc)
        for g in att.groups:
            source.update(g.acc)
        for p in att.trainable:
            if p not in buckets.keys:
                buckets.add(p, _grad_or_zeros(source, p))
        summed = buckets.wait()
        step.overlap = None
        return summed

    def _discard_gradients(self, step) -> None:
        """A dropped step: complete the all-reduces already launched (every rank launched the same)."""
        if step.overlap is not None:
            step.overlap.wait()
            step.overlap = None


class _Meta:
    """What the division needs from the metadata all-reduce."""

    def __init__(self, plain, present: list, group_of: dict):
        self.plain, self.present, self.group_of = plain, present, group_of


def _grad_or_zeros(accs: dict, p) -> torch.Tensor:
    acc = accs.get(p)
    return torch.zeros_like(p, memory_format=torch.contiguous_format) if acc is None else acc


def make_reduction(model, process_group, distributed, device, pad_token_id: int, warn) -> LocalReduction:
    """One process, data parallelism (``torchrun``, unwrapped model) or an FSDP2-sharded model."""
    from . import reduce_fsdp

    units = reduce_fsdp.fsdp_modules(model)
    if units or any(reduce_fsdp.is_dtensor(p) for p in model.parameters()):
        ctx = reduce_fsdp.sharded_context(model, units, process_group, distributed, device)
        return reduce_fsdp.ShardedReduction(ctx, pad_token_id, warn, units)
    ctx = _dist.resolve(process_group, distributed, device)
    return LocalReduction() if ctx is None else DistributedReduction(ctx, pad_token_id, warn)


def add_grad(p: torch.nn.Parameter, g: torch.Tensor) -> None:
    """``p.grad += g`` as autograd would: take ``g`` itself when ``p`` has no gradient yet."""
    if p.grad is None:
        p.grad = g
    else:
        p.grad = p.grad + g


def _drop_step(att, step) -> None:
    for p in att.trainable:
        p.grad = None
    step.stats.skipped = True


def _age_target(pipeline) -> None:
    target = pipeline.target
    if pipeline.options.target_strategy == "separate" and target.age is not None:
        target.age += 1


def _packed(batch: dict | None) -> bool:
    return batch is not None and not batch["_layout"].identity
