"""Offline gradient-based data selection (LESS-style): the baseline the online feasible sets are compared with.

LESS (Xia et al., 2024) selects a subset of the general pool *once*, before training: after a short
warm-up on the pool, every general example is scored by the cosine between its loss gradient and the
target gradient, the top share of the pool is kept, and a model is trained plainly on that subset.
Dr. Post-Training instead re-decides at every step, per layer, inside the backward pass.

:func:`gradient_cosines` is the scoring, exact:

- the features are the gradients of the model's *trainable* parameters (the LoRA adapters in a LoRA
  run, as LESS does; every trained weight in full fine-tuning), one backward per general example
  (a batch of one row: no padding interplay) of its token-sum cross-entropy;
- the target gradient is that of the token-mean cross-entropy over all target examples;
- ``score_i = <g_i, g_T> / (|g_i| |g_T|)``, accumulated in float64. LESS projects its features to a few
  thousand dimensions because it stores them for millions of examples and many validation examples;
  with one target gradient the cosine is computed on the fly, so nothing is projected. (LESS also
  preconditions the training gradients with the warm-up's Adam state; these are plain gradients.)

:func:`top_share` keeps the ``ceil(share * N)`` best-scored examples (ties: the lower index). The recipe
side (warm-up, subset, training from the base model) is :mod:`drpost.recipes.offline`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from drpost.batch import causal_lm_token_losses
from drpost.data.chat import collate

__all__ = ["OfflineScores", "gradient_cosines", "loss_gradient", "top_share"]


@dataclass
class OfflineScores:
    scores: torch.Tensor   # [N] float64 cosines, one per general example
    seconds: float         # wall time of the scoring (target gradient included)
    n_params: int          # trainable parameters the features live in

    @property
    def seconds_per_example(self) -> float:
        return self.seconds / max(1, self.scores.numel())


def _trainable(model) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("offline selection scores gradients of the trainable parameters, and the model has none: "
                         "unfreeze what the run trains (LoRA adapters or weights) before scoring")
    return params


def loss_gradient(model, rows: Sequence[dict], params: list, pad_id: int = 0, autocast_dtype=None,
                  batch_size: int = 8, token_mean: bool = True) -> list[torch.Tensor]:
    """The gradient of the cross-entropy summed over the supervised tokens of ``rows`` (divided by
    their number if ``token_mean``), w.r.t. ``params``, in float32 (float64 for float64 parameters); rows are forwarded
    ``batch_size`` at a time and their gradients summed (the result does not depend on it)."""
    device = params[0].device
    total = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    tokens = 0
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        batch = collate(chunk, pad_id=pad_id)
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        mask = batch.get("attention_mask")
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with ctx:
            out = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device))
        logits = out.logits if hasattr(out, "logits") else out
        losses, supervised = causal_lm_token_losses(logits, {"labels": labels})
        n = int(supervised.sum())
        if n == 0:
            continue
        loss = losses[supervised].sum(dtype=torch.promote_types(losses.dtype, torch.float32))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g.to(acc.dtype))
        tokens += n
    if tokens == 0:
        raise ValueError(f"no supervised tokens in the {len(rows)} row(s) given (every label is -100): "
                         "nothing to take the gradient of")
    if token_mean:
        for acc in total:
            acc.div_(tokens)
    return total


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b)))


def gradient_cosines(model, general_rows: Sequence[dict], target_rows: Sequence[dict], pad_id: int = 0,
                     autocast_dtype=None, progress: bool = False) -> OfflineScores:
    """``cos(g_i, g_T)`` for every general row (see the module docstring). The model is put in eval
    mode (no dropout) while scoring and restored after; its ``.grad`` fields are not touched."""
    if not len(target_rows):
        raise ValueError("offline selection needs at least one target example to take the target gradient of")
    from tqdm.auto import tqdm

    params = _trainable(model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        target = loss_gradient(model, target_rows, params, pad_id, autocast_dtype)
        target_norm = math.sqrt(_dot(target, target))
        if not math.isfinite(target_norm):
            raise FloatingPointError("the target gradient is not finite: check the model and the target examples")
        scores = torch.zeros(len(general_rows), dtype=torch.float64)
        for i, row in enumerate(tqdm(general_rows, desc="offline scoring", unit="row", disable=not progress,
                                     dynamic_ncols=True)):
            try:
                g = loss_gradient(model, [row], params, pad_id, autocast_dtype, token_mean=False)
            except ValueError:
                raise ValueError(f"general example {i} has no supervised tokens (every label is -100): drop it "
                                 "from the pool or fix its labels") from None
            norm = math.sqrt(_dot(g, g))
            scores[i] = _dot(g, target) / (norm * target_norm) if norm > 0 and target_norm > 0 else 0.0
    finally:
        model.train(was_training)
    return OfflineScores(scores=scores, seconds=time.perf_counter() - t0, n_params=sum(p.numel() for p in params))


def top_share(scores: torch.Tensor | Sequence[float], share: float) -> list[int]:
    """Indices of the ``ceil(share * N)`` highest scores, in pool order (ties: the lower index).
    Non-finite scores rank last."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"the kept share of the pool must be in (0, 1], got {share!r}")
    s = torch.as_tensor(scores, dtype=torch.float64).clone()
    n = s.numel()
    if n == 0:
        raise ValueError("no general examples to select from")
    s[~torch.isfinite(s)] = -math.inf
    k = max(1, math.ceil(share * n - 1e-9))
    # stable descending sort: equal scores keep pool order, so ties go to the lower index
    order = torch.sort(-s, stable=True).indices[:k]
    return sorted(order.tolist())


def describe(scores: OfflineScores, kept: list[int], rows: Any) -> dict[str, Any]:
    """What the selection did, for the run's metrics: how many rows kept, the rows of each kind in the
    pool and in the subset (rows with a ``kind``), the mean scores and the cost."""
    out: dict[str, Any] = {"pool": int(scores.scores.numel()), "kept": len(kept),
                           "seconds_scoring": scores.seconds, "seconds_per_example": scores.seconds_per_example,
                           "feature_params": scores.n_params,
                           "score_mean_pool": float(scores.scores.mean()),
                           "score_mean_kept": float(scores.scores[kept].mean())}
    kinds = [r.get("kind") for r in rows] if rows is not None else None
    if kinds and all(k is not None for k in kinds):
        out["kinds_pool"], out["kinds_kept"] = dict(Counter(kinds)), dict(Counter(kinds[i] for i in kept))
    return out
