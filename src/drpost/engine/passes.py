"""The forward/backward passes of one ``backward`` call, by feasible set and target strategy.

* :meth:`Passes.plain` — ``standard`` (general rows) or ``target_only`` (target rows): ordinary
  autograd on a token-sum loss; no hooks run.
* :meth:`Passes.merged` — general rows followed by the target rows in one forward and one backward;
  the hooks score, select and accumulate inside it.
* :meth:`Passes.capture` then :meth:`Passes.general` — the separate strategy: the target gradient is
  captured (and cached for ``refresh_every`` steps), then the general rows go through their own pass.

Every loss is the SUM of per-token losses, so every per-sample gradient is a token sum; the
division by token counts happens once, at finalize (METHOD §1.6). A sample is a row, or one
sequence of a packed row (:mod:`drpost.packing`); the counts below are of samples.

Activation checkpointing re-runs forward hooks inside the backward: every backward here runs with
``step.in_backward`` set (the hooks then do not count calls), and a capture whose forward ran under
reentrant checkpointing (``step.grad_off``) uses ``loss.backward()`` with the gradients put aside,
since reentrant checkpointing refuses ``torch.autograd.grad``. ``global_memory='recompute'``
keeps the graph of a selecting backward and runs it once more after the global decision
(:meth:`Passes._chosen_backward`).
"""
from __future__ import annotations

import torch

from ..batch import merge_batches, require_supervised, row_losses
from ..group import add_into
from ..packing import FLASH_KEYS, layout_of


def n_samples(batch: dict) -> int:
    layout = batch.get("_layout")
    return layout.n if layout is not None else batch["input_ids"].shape[0]


class Passes:
    def __init__(self, model, loss_fn, pad_token_id: int, pipeline, reduction):
        self.model, self.loss_fn, self.pad_token_id = model, loss_fn, pad_token_id
        self.pipeline, self.reduction = pipeline, reduction
        self.att = None          # the controller's current Attachment
        self.where = lambda: ""  # "at step N of this DataRegularizer" (error messages)

    # ------------------------------------------------------------------ helpers
    def _forward(self, batch: dict, mode: str, n_general: int, n_target: int):
        self.pipeline.begin_forward(mode, batch["input_ids"].shape[0], n_general, n_target, batch.get("_layout"))
        with self.pipeline.phase("forward"):
            return row_losses(self.model, batch, self.loss_fn)

    def _loss_ok(self, loss: torch.Tensor, what: str) -> bool:
        opts = self.pipeline.options
        return self.reduction.check_loss(self.pipeline.step, loss, what, opts, self.where())

    def _backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """``loss.backward()`` with the plain parameters' gradients collected into the step's
        accumulator (and their previous ``.grad`` restored)."""
        params, acc = self.att.plain_params, self.pipeline.step.plain_acc
        for p, g in self._backward_aside(loss, params, retain_graph).items():
            add_into(acc, p, g)

    def _backward_aside(self, loss: torch.Tensor, params, retain_graph: bool = False) -> dict:
        """``loss.backward()`` with the gradients it leaves on ``params`` taken out and returned
        ({param: grad}) and their previous ``.grad`` restored. ``step.in_backward`` tells the hooks
        that a forward call seen meanwhile is an activation-checkpoint recomputation."""
        step = self.pipeline.step
        if not loss.requires_grad:
            self.pipeline.check_recomputed()   # a reentrant checkpoint that nothing requires grad into
        old = {p: p.grad for p in params}
        for p in params:
            p.grad = None
        step.in_backward = True
        try:
            with self.pipeline.phase("backward"):
                loss.backward(retain_graph=retain_graph)
        finally:
            step.in_backward = False
            out = {}
            for p in params:
                g, p.grad = p.grad, old[p]
                if g is not None:
                    out[p] = g
        self.pipeline.check_recomputed()
        return out

    def _general_tokens(self, sums, tokens, b: int) -> None:
        step = self.pipeline.step
        step.tokens_general = tokens[:b]
        t_gen = tokens[:b].sum()
        step.stats.add("general", sums[:b].detach().sum(), t_gen)
        if tokens.shape[0] > b:
            t_tgt = tokens[b:].sum()
            self.pipeline.target.tokens = t_tgt
            step.stats.add("target", sums[b:].detach().sum(), t_tgt)
            require_supervised(t_tgt, "target")
        self.reduction.require_supervised(t_gen, "general")
        step.add_plain_tokens(t_gen)

    def _selecting_backward(self, loss: torch.Tensor, what: str) -> None:
        if not self._loss_ok(loss, what):
            return
        recompute = self.pipeline.recomputes_global
        self._backward(loss, retain_graph=recompute)
        self.pipeline.finish_global()
        if recompute and self.pipeline.step.global_choice is not None:
            self._chosen_backward(loss)

    def _chosen_backward(self, loss: torch.Tensor) -> None:
        """``global_memory='recompute'``: the same backward again, after the one decision; the taps
        hand their factors in once more and each group assembles the chosen samples at once. The
        plain parameters' gradients of this pass are the first pass's again: discarded (and the
        norm taps do not report theirs, see hooks.py)."""
        pipeline = self.pipeline
        pipeline.begin_second_pass()
        try:
            self._backward_aside(loss, self.att.plain_params)
            pipeline.flush_pending()
        finally:
            pipeline.step.global_choice = None

    # ------------------------------------------------------------------ the passes
    def plain(self, general: dict, target: dict | None) -> None:
        """standard (general rows) or target_only (target rows): ordinary autograd, token sums."""
        fset, step = self.pipeline.options.feasible_set, self.pipeline.step
        train, other = (general, target) if fset == "standard" else (target, general)
        step.mode = None
        stats = step.stats
        if train is None:          # distributed target_only: no target rows on this rank
            with torch.no_grad():
                gs, gt = row_losses(self.model, other, self.loss_fn)
            stats.add("general", gs.sum(), gt.sum())
            return
        with self.pipeline.phase("forward"):
            sums, tokens = row_losses(self.model, train, self.loss_fn)
        self.reduction.require_supervised(tokens, "general" if train is general else "target")
        loss = sums.sum()
        t_total = tokens.sum()
        if fset == "standard":
            stats.add("general", loss.detach(), t_total)
        else:
            stats.add("target", loss.detach(), t_total)
            with torch.no_grad():
                gs, gt = row_losses(self.model, other, self.loss_fn)
            stats.add("general", gs.sum(), gt.sum())
        if not self._loss_ok(loss, "training"):
            return
        self._backward(loss)
        step.add_plain_tokens(t_total)

    def merged(self, general: dict, target: dict) -> None:
        b = n_samples(general)
        merged = merge_batches(general, target, self.pad_token_id)
        sums, tokens = self._forward(merged, "merged", b, n_samples(target))
        try:
            self._general_tokens(sums, tokens, b)
            self._selecting_backward(sums.sum(), "general+target")
        finally:
            self.pipeline.step.mode = None

    def general(self, general: dict) -> None:
        b = n_samples(general)
        sums, tokens = self._forward(general, "general", b, 0)
        target = self.pipeline.target
        try:
            self._general_tokens(sums, tokens, b)
            self.pipeline.step.stats.add("target", target.loss * target.tokens, target.tokens)
            self._selecting_backward(sums.sum(), "general")
        finally:
            self.pipeline.step.mode = None

    def capture(self, target: dict, chunk_size: int | None = None) -> None:
        """Separate strategy: compute and cache every group's target representation (raw sums over
        the target rows), in chunks of ``chunk_size`` rows if given (the chunks are summed)."""
        groups = self.att.groups
        for g in groups:
            g.cache = None
        n = target["input_ids"].shape[0]
        step = chunk_size or n
        if step < n and any(k in target for k in FLASH_KEYS):
            raise ValueError("a target batch with flash-attention kwargs (cu_seq_lens_q, ...) cannot be split "
                             "into chunks of rows; capture it whole or drop those keys (position_ids suffice)")
        total_tokens, total_loss = None, None
        params = [p for g in groups for p in g.params]
        try:
            for start in range(0, n, step):
                chunk = {k: (v[start:start + step] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n
                             else v) for k, v in target.items()}
                if step < n:
                    chunk["_layout"] = layout_of(chunk)
                sums, tokens = self._forward(chunk, "capture", 0, n_samples(target))
                loss = sums.sum()
                if not self._loss_ok(loss, "target"):
                    return
                if self.pipeline.step.grad_off:
                    # reentrant checkpointing refuses torch.autograd.grad: a full backward whose
                    # gradients are discarded (the scored layers' taps return none)
                    self._backward_aside(loss, self.att.trainable)
                else:
                    self.pipeline.step.in_backward = True
                    try:
                        torch.autograd.grad(loss, params, allow_unused=True)
                    finally:
                        self.pipeline.step.in_backward = False
                self.pipeline.flush_pending()
                total_tokens = tokens.sum() if total_tokens is None else total_tokens + tokens.sum()
                total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
        finally:
            self.pipeline.step.mode = None
        require_supervised(total_tokens, "target")
        state = self.pipeline.target
        state.tokens, state.loss, state.age = total_tokens, total_loss / total_tokens, 0
        for g in groups:
            if g.cache is not None:
                reprs = g.cache["repr"]
                vals = reprs.values() if isinstance(reprs, dict) else []
                for t in vals:
                    flag = ~torch.isfinite(t).all()
                    g.bad = flag if g.bad is None else g.bad | flag
