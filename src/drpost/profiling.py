"""Wall-time breakdown of a drpost step by phase (used by ``drpost bench``).

    timer = PhaseTimer(sync=torch.cuda.is_available())
    reg.profiler = timer
    reg.backward(general, target)
    timer.seconds  # {"forward": ..., "backward": ..., "scoring": ..., "selection": ..., ...}
    timer.by_kind  # {"scoring": {"linear q_proj": ..., "tied": ...}, "weight_grad": {...}}

Phases nest (``scoring`` runs inside the autograd backward): each phase is charged its
*exclusive* time, so the parts add up to the total and ``backward`` is what the backward pass
spent outside drpost's own work (activation gradients, attention, autograd bookkeeping). On CUDA
every phase boundary synchronises the device, which serialises the step: time a breakdown in
separate repetitions from the ones whose medians are compared.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

__all__ = ["PhaseTimer"]


class PhaseTimer:
    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.seconds: dict[str, float] = defaultdict(float)
        self.by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._stack: list[list] = []  # [name, start, child seconds]

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str, kind: str | None = None):
        """Charge the block's exclusive time to ``name`` (and, given a layer ``kind``, to
        ``by_kind[name][kind]`` as well)."""
        self._stack.append([name, self._now(), 0.0])
        try:
            yield
        finally:
            _, start, children = self._stack.pop()
            elapsed = self._now() - start
            self.seconds[name] += elapsed - children
            if kind is not None:
                self.by_kind[name][kind] += elapsed - children
            if self._stack:
                self._stack[-1][2] += elapsed

    def reset(self) -> None:
        self.seconds = defaultdict(float)
        self.by_kind = defaultdict(lambda: defaultdict(float))
        self._stack = []
