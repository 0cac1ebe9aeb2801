"""Products of a layer's input that several scored layers would each compute: layers fed one input
tensor (q/k/v of a decoder layer, gate/up of its MLP, the lora_A's of LoRA on them) compute it once.

Two kinds are kept: ``pairwise_ghost``'s input-side Gram (x_s . x_t) and the ``sketch`` back-end's
input-side sketch x P2 (sharers draw the same P2: ``drpost.scoring.sketch.projection``). Their
groups are scored close together in the backward (with LoRA, each lora_B between the lora_A's), so
a short most-recent-first list holds them.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch


def tensor_key(t: torch.Tensor) -> tuple:
    """What identifies one tensor's current contents: its memory, shape, strides, dtype, device and
    version (no in-place change since). Only meaningful while the tensor is alive."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


class InputProducts(threading.local):
    """The last few input products computed. An entry holds the tensors it was computed from, so no
    other tensor can take their memory while it is kept, and matches only the same kind of product
    (``tag``) of the same memory, shape, strides and version (no in-place change since). The engine
    clears it after every backward, so that it keeps nothing alive; it is per thread."""

    size = 6

    def __init__(self):
        self.entries: list = []
        self.enabled = True

    def get(self, tag: tuple, tensors: tuple, compute):
        """``compute()``, or the value kept for the same ``tag`` of the same ``tensors``."""
        if not self.enabled:
            return compute()
        key = (tag,) + tuple(tensor_key(t) for t in tensors)
        for entry in self.entries:
            if entry[0] == key:
                return entry[-1]
        value = compute()
        self.entries = [(key, tensors, value)] + self.entries[:self.size - 1]
        return value

    def clear(self) -> None:
        self.entries = []

    @contextmanager
    def disabled(self):
        """No reuse inside (timing one rule's scores: calibration)."""
        old, self.enabled = self.enabled, False
        self.clear()
        try:
            yield
        finally:
            self.enabled = old


INPUT_PRODUCTS = InputProducts()
