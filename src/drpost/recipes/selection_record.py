"""What the selection did with the target-like rows, step by step: :class:`SelectionRecorder`.

A :class:`transformers.TrainerCallback` plus a step observer of the SFT recipe's trainer
(``run_sft(cfg, on_trainer=recorder.attach)``). After every micro-batch it reads the rows'
kinds, which of them are *target-like* (the target task's kind: headlines of the other BBC sections
when the target is BBC tech headlines) and the regularizer's selection masks (``last_masks``,
gathered over the ranks under ``torchrun``), and records per step:

- ``batch_rows``, ``batch_headline`` (target-like rows), ``batch_headline_share``, ``batch_kinds``;
- ``chosen_picks`` (kept (layer, row) pairs), ``chosen_headline_picks``, ``chosen_headline_share`` and
  ``headline_pick_rate`` (the share of the target-like rows' (layer, row) slots that were kept);

plus, per decoder block, the pick rate of the target-like rows (the heat map) and the full masks of
the first ``keep_masks`` steps (the example mask). ``standard`` keeps every row; ``target_only``
keeps none of the general rows and has no chosen statistics. Also times every step and sums the
evaluation time.
"""

from __future__ import annotations

import re
import time

import torch
from transformers import TrainerCallback

__all__ = ["SelectionRecorder"]

_BLOCK = re.compile(r"\.(\d+)\.")
_FLAGS = "\0target_like"  # the flags ride in the same gather as the masks


def _block_of(name: str) -> str:
    m = _BLOCK.search(name)
    return m.group(1) if m else name


class SelectionRecorder(TrainerCallback):
    def __init__(self, feasible_set: str, ranks, keep_masks: int = 10):
        self.feasible_set, self.ranks, self.keep_masks = feasible_set, ranks, keep_masks
        self.records: list[dict] = []
        self.eval_seconds = 0.0
        self.modules: list[str] | None = None
        self.blocks: list[str] = []
        self.block_rate: list[list[float | None]] = []  # per step with target-like rows: [blocks]
        self.block_steps: list[int] = []
        self.masks: dict[int, list[list[int]]] = {}  # step -> [modules][rows] (first steps only)
        self._order: dict | None = None
        self._t0 = None

    def attach(self, trainer) -> None:
        """``run_sft(..., on_trainer=recorder.attach)``."""
        trainer.add_callback(self)
        trainer.step_observers.append(self.observe)
        self._order = {name: i for i, (name, _) in enumerate(trainer.model.named_modules())}

    # ------------------------------------------------------------------ trainer events
    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None and self.records:
            self.records[-1]["seconds"] = time.perf_counter() - self._t0
        self._t0 = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.eval_seconds += float((metrics or {}).get("eval_runtime", 0.0))

    def observe(self, trainer, flags, kinds) -> None:
        """Every rank, after every micro-batch: gather the whole batch's rows and masks, record on rank 0."""
        if flags is None or kinds is None:
            return
        reg, selects = trainer.regularizer, self.feasible_set not in ("standard", "target_only")
        masks = dict(reg.last_masks) if selects and reg is not None else {}
        masks = {k: m for k, m in masks.items() if m.dim() >= 1 and m.shape[0] == flags.numel()}
        masks = self.ranks.gather_masks({**masks, _FLAGS: flags.reshape(-1)})
        is_head = masks.pop(_FLAGS).reshape(-1).to(torch.bool)
        if self.ranks.world > 1:
            every = [None] * self.ranks.world
            torch.distributed.all_gather_object(every, list(kinds))
            kinds = [k for part in every for k in part]
        if not self.ranks.main:
            return
        step = trainer.state.global_step + 1
        n, n_head = len(kinds), int(is_head.sum())
        record = {"step": step, "batch_rows": n, "batch_headline": n_head, "batch_headline_share": n_head / n,
                  "batch_kinds": list(kinds)}
        if self.feasible_set == "standard":  # every row of the batch is used
            record.update(chosen_picks=float(n), chosen_headline_picks=float(n_head), chosen_headline_share=n_head / n,
                          headline_pick_rate=1.0 if n_head else None)
        elif selects:
            record.update(self._record_masks(step, masks, is_head))
        self.records.append(record)

    # ------------------------------------------------------------------ statistics
    def _record_masks(self, step: int, masks: dict, is_head: torch.Tensor) -> dict:
        if not masks:
            return {}
        if self.modules is None:
            order = self._order or {}
            self.modules = sorted(masks, key=lambda n: order.get(n, 1 << 30))
            self.blocks = list(dict.fromkeys(_block_of(n) for n in self.modules))
        picks = head_picks = head_slots = 0.0
        per_block: dict[str, list[float]] = {}
        rows_mask = []
        for name in [n for n in self.modules if n in masks]:
            flat = masks[name].detach().to("cpu", torch.bool).reshape(is_head.numel(), -1).float()  # [B, columns]
            picks += float(flat.sum())
            hp, hs = float(flat[is_head].sum()), float(is_head.sum()) * flat.shape[1]
            head_picks += hp
            head_slots += hs
            b = per_block.setdefault(_block_of(name), [0.0, 0.0])
            b[0] += hp
            b[1] += hs
            if step <= self.keep_masks:
                rows_mask.append([int(v) for v in (flat.mean(1) > 0.5).tolist()])
        if step <= self.keep_masks:
            self.masks[step] = rows_mask
        if head_slots:
            self.block_steps.append(step)
            self.block_rate.append([per_block[b][0] / per_block[b][1] if b in per_block else None
                                    for b in self.blocks])
        return {"chosen_picks": picks, "chosen_headline_picks": head_picks,
                "chosen_headline_share": head_picks / picks if picks else None,
                "headline_pick_rate": head_picks / head_slots if head_slots else None}

    def summary(self, history: list[dict]) -> dict:
        """Run-level shares over ``history`` (the records, possibly merged with the training logs)."""
        picks = sum(h.get("chosen_picks", 0.0) for h in history)
        rows = sum(h["batch_rows"] for h in history)
        heads = sum(h["batch_headline"] for h in history)
        out = {"batch_headline_share": heads / rows if rows else None,
               "chosen_headline_share": None, "headline_pick_rate": None}
        if self.feasible_set != "target_only" and picks:
            out["chosen_headline_share"] = sum(h.get("chosen_headline_picks", 0.0) for h in history) / picks
            rates = [(h["headline_pick_rate"], h["batch_headline"]) for h in history
                     if h.get("headline_pick_rate") is not None]
            w = sum(n for _, n in rates)
            out["headline_pick_rate"] = sum(r * n for r, n in rates) / w if w else None
        if self.feasible_set not in ("standard", "target_only") and self.modules:
            out["layer_pick_rate"] = {"blocks": self.blocks, "steps": self.block_steps, "rate": [
                [row[b] for row in self.block_rate] for b in range(len(self.blocks))]}
            if self.masks:  # an early batch with the most target-like rows (the selection signal fades later)
                by_step = {h["step"]: h for h in history}
                step = max(self.masks, key=lambda s: (by_step[s]["batch_headline"], -s))
                out["example_mask"] = {"step": step, "kinds": by_step[step]["batch_kinds"],
                                       "modules": self.modules, "mask": self.masks[step]}
        return out
