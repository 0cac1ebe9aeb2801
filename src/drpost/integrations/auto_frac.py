"""``frac='auto'`` in :class:`~drpost.integrations.DrPostTrainer`: the regularization strength chosen online.

The trainer holds ``auto_holdout`` target examples back as a *validation slice* (a seeded choice
of rows, never drawn for a target gradient) and plays the candidates ``auto_fracs`` by the
successive-elimination schedule of :class:`drpost.frac_schedule.FracSchedule`:

* a *segment* is ``auto_every`` optimisation steps trained with one candidate frac;
* the validation slice is evaluated once per segment boundary (eval mode, no grad, the training
  step's autocast: :func:`drpost.evaluation.perplexity` on the prepared model inside
  ``compute_loss_context_manager()``), so ``L_after`` of one segment is ``L_before`` of the next;
  the token-mean cross-entropy of the slice's supervised tokens is ``L``;
* the segment's reward is ``(L_before - L_after) / L_before``; after every round (every alive
  candidate played once, in a seeded order) the candidate with the lowest mean reward is
  eliminated (ties keep the larger frac), until one is left: it is used for the rest of training
  and the slice is no longer evaluated.

The evaluation of a boundary runs at the start of the next step (the weights are the same as at
the end of the previous one), so a checkpoint taken at a boundary holds "evaluation pending" and
a resumed run evaluates the restored weights: the frac trajectory and the weights of a resumed run
are those of the uninterrupted one (:meth:`AutoFrac.state_dict` travels in ``drpost_state.pt``).

One process only: every rank would evaluate the slice itself and nothing makes the ranks agree on
the losses' last bits (and therefore on the frac), so the trainer refuses ``frac='auto'`` under
``torchrun``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..frac_schedule import FracSchedule


def holdout_rows(n: int, holdout: int, seed: int) -> list[int]:
    """The validation slice: ``holdout`` of the ``n`` target rows, a seeded choice (ascending)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + 104_729) % 2 ** 63)
    return sorted(torch.randperm(n, generator=g)[:holdout].tolist())


class AutoFrac:
    """The segment bookkeeping around a :class:`FracSchedule`: when to evaluate, the rewards, the
    per-step frac history. :meth:`before_step` at the first micro-batch of every optimisation step,
    :meth:`after_step` once the step is finished."""

    def __init__(self, fracs, every: int, seed: int, holdout: list[int]):
        self.schedule = FracSchedule(fracs, seed)
        self.every = int(every)
        self.holdout = list(holdout)
        self.loss_before: float | None = None   # validation loss at the start of the current segment
        self.segment_start = 0                  # global step the current segment started at
        self.steps_in_segment = 0
        self.segments: list[dict] = []          # one entry per finished segment
        self.fracs_per_step: list[float] = []   # the frac every optimisation step used

    @property
    def frac(self) -> float:
        return self.schedule.frac

    def before_step(self, step: int, evaluate: Callable[[], float]) -> float:
        """The frac of optimisation step ``step + 1`` (``step`` = steps done); ``evaluate()`` returns the
        validation-slice loss of the current weights (called at segment boundaries only)."""
        s = self.schedule
        if s.exploring and self.loss_before is not None and self.steps_in_segment >= self.every:
            after = float(evaluate())
            before = self.loss_before
            reward = (before - after) / before if math.isfinite(after) and math.isfinite(before) and before > 0 \
                else -math.inf     # a non-finite validation loss is the worst segment
            self.segments.append({"round": s.round, "frac": s.frac, "start_step": self.segment_start,
                                  "end_step": step, "loss_before": before, "loss_after": after, "reward": reward})
            s.record(reward)
            self.loss_before, self.segment_start, self.steps_in_segment = after, step, 0
        if s.exploring and self.loss_before is None:
            self.loss_before, self.segment_start, self.steps_in_segment = float(evaluate()), step, 0
        return s.frac

    def after_step(self, frac: float) -> None:
        self.steps_in_segment += 1
        self.fracs_per_step.append(float(frac))

    # ------------------------------------------------------------------ reports
    def summary(self) -> dict:
        """What ``metrics.json`` records: the candidates, every segment, the eliminations, the choice,
        the frac per step and its mean."""
        s, fracs = self.schedule, self.fracs_per_step
        return {"candidates": list(s.fracs), "every": self.every, "holdout_rows": list(self.holdout),
                "segments": [dict(x) for x in self.segments],
                "eliminated": [{"round": r, "frac": f, "mean_reward": m} for r, f, m in s.eliminated],
                "alive": list(s.alive), "chosen": s.chosen,
                "mean_reward": {f"{f:g}": s.mean_reward(f) for f in s.fracs},
                "frac_per_step": list(fracs), "mean_frac": sum(fracs) / len(fracs) if fracs else None}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "every": self.every, "holdout": list(self.holdout),
                "loss_before": self.loss_before, "segment_start": self.segment_start,
                "steps_in_segment": self.steps_in_segment, "segments": [dict(x) for x in self.segments],
                "fracs_per_step": list(self.fracs_per_step)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["holdout"]) != self.holdout or int(state["every"]) != self.every:
            raise ValueError(f"the checkpoint's frac='auto' held out the target rows {state['holdout']} with segments "
                             f"of {state['every']} steps, this run {self.holdout} with {self.every}: resume with the "
                             "same target dataset, seed, auto_holdout and auto_every")
        self.schedule.load_state_dict(state["schedule"])
        self.loss_before = None if state["loss_before"] is None else float(state["loss_before"])
        self.segment_start = int(state["segment_start"])
        self.steps_in_segment = int(state["steps_in_segment"])
        self.segments = [dict(x) for x in state["segments"]]
        self.fracs_per_step = [float(f) for f in state["fracs_per_step"]]
