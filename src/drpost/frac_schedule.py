"""``frac: auto``: the successive-elimination schedule that picks the regularization strength online.

:class:`FracSchedule` is the pure bookkeeping (no model, no data): the trainer
(:mod:`drpost.integrations.auto_frac`) plays the frac it names for one *segment* of optimisation
steps, measures the segment's reward and hands it to :meth:`FracSchedule.record`.

* Candidates ``fracs`` (distinct numbers in (0, 1]); all of them start *alive*.
* Rounds: each round plays every alive candidate for one segment, in an order drawn from a
  generator seeded with ``(seed, round)`` (so the order depends on nothing but the seed and the
  round number, and the state to checkpoint is plain numbers).
* After each round the alive candidate with the lowest mean reward (over all its segments so far)
  is eliminated; among equal means the smaller frac goes (ties keep the larger frac, the weaker
  regularization). When one candidate is left it is *chosen* and played for the rest of training.
* A segment's reward is the relative drop of the validation-slice loss over it,
  ``(L_before - L_after) / L_before`` (computed by the caller).

With C candidates the exploration lasts C + (C - 1) + ... + 2 segments; a run that ends earlier
simply stops exploring.
"""
from __future__ import annotations

import torch

DEFAULT_AUTO_FRACS = (0.125, 0.25, 0.5, 0.75, 1.0)


class FracSchedule:
    """Successive elimination over interleaved rounds (see the module docstring).

    State: ``alive`` (candidates still in play, ascending), ``rewards`` ({frac: [reward per
    segment]}), ``round`` (rounds finished), ``order`` (this round's play order), ``position``
    (segments of this round played), ``eliminated`` ([(round, frac, mean reward)])."""

    def __init__(self, fracs, seed: int = 0):
        fracs = [float(f) for f in fracs]
        if not fracs or len(set(fracs)) != len(fracs) or not all(0.0 < f <= 1.0 for f in fracs):
            raise ValueError(f"the candidates of frac='auto' must be distinct numbers in (0, 1], got {fracs!r}")
        self.fracs = sorted(fracs)
        self.seed = int(seed)
        self.alive = list(self.fracs)
        self.rewards: dict[float, list[float]] = {f: [] for f in self.fracs}
        self.round = 0
        self.position = 0
        self.eliminated: list[tuple[int, float, float]] = []
        self.order = self._draw_order()

    # ------------------------------------------------------------------ what it says
    @property
    def chosen(self) -> float | None:
        """The one candidate left (played for the rest of training), or None while exploring."""
        return self.alive[0] if len(self.alive) == 1 else None

    @property
    def exploring(self) -> bool:
        return self.chosen is None

    @property
    def frac(self) -> float:
        """The frac to play now (the current segment's, or the chosen one)."""
        return self.chosen if self.chosen is not None else self.order[self.position]

    def mean_reward(self, frac: float) -> float | None:
        r = self.rewards[frac]
        return sum(r) / len(r) if r else None

    # ------------------------------------------------------------------ what changes it
    def _draw_order(self) -> list[float]:
        if len(self.alive) == 1:
            return list(self.alive)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * (self.round + 1)) % 2 ** 63)
        return [self.alive[i] for i in torch.randperm(len(self.alive), generator=g).tolist()]

    def record(self, reward: float) -> float | None:
        """The reward of the segment just played with :attr:`frac`; at the end of a round the worst
        candidate is eliminated and the next round's order drawn. Returns the eliminated frac (or None)."""
        if not self.exploring:
            raise RuntimeError("FracSchedule.record after the choice: nothing is being explored")
        self.rewards[self.frac].append(float(reward))
        self.position += 1
        if self.position < len(self.order):
            return None
        # end of the round: the lowest mean goes; among equal means the smallest frac (ties keep the larger)
        worst = min(self.alive, key=lambda f: (self.mean_reward(f), f))
        self.eliminated.append((self.round, worst, self.mean_reward(worst)))
        self.alive.remove(worst)
        self.round += 1
        self.position = 0
        self.order = self._draw_order()
        return worst

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"fracs": list(self.fracs), "seed": self.seed, "alive": list(self.alive),
                "rewards": [[f, list(self.rewards[f])] for f in self.fracs], "round": self.round,
                "position": self.position, "order": list(self.order),
                "eliminated": [list(e) for e in self.eliminated]}

    def load_state_dict(self, state: dict) -> None:
        if [float(f) for f in state["fracs"]] != self.fracs:
            raise ValueError(f"the checkpoint's frac='auto' explored the candidates {state['fracs']} but this run's "
                             f"auto_fracs are {self.fracs}: resume with the same auto_fracs")
        self.seed = int(state["seed"])
        self.alive = [float(f) for f in state["alive"]]
        self.rewards = {float(f): [float(x) for x in r] for f, r in state["rewards"]}
        self.round, self.position = int(state["round"]), int(state["position"])
        self.order = [float(f) for f in state["order"]]
        self.eliminated = [(int(r), float(f), float(m)) for r, f, m in state["eliminated"]]
