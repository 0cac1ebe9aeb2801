"""The target batches of :class:`drpost.integrations.DrPostTrainer`: an endless, seeded stream."""
from __future__ import annotations

import torch


class TargetSampler:
    """Endless, seeded stream of target batches (lists of row indices).

    Target epoch e is a permutation of the rows drawn from a generator seeded with (seed, e); it is
    cut into ``n // batch_size`` batches (a batch never repeats a row; the ``n % batch_size`` rows left
    over go unused that epoch, a different few each epoch). The state ``(seed, epoch, position)``
    determines every future batch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"target_batch_size ({batch_size}) is larger than the target dataset ({n} rows)")
        self.n, self.batch_size, self.seed = n, batch_size, int(seed)
        self.epoch, self.position = 0, 0
        self._perm, self._perm_epoch = None, None

    def _permutation(self) -> list:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 63)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), self.epoch
        return self._perm

    def next_indices(self) -> list:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        out = self._permutation()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "n": self.n,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"the checkpoint's target sampler ran over {state['n']} target rows but this run's "
                             f"target dataset has {self.n}: resume with the same target dataset")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
