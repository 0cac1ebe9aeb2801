"""Perplexity over the supervised (assistant) tokens, with the training loss convention.

Labels follow the training convention (:mod:`drpost.batch`): ``-100`` marks positions without
loss and position t predicts ``labels[:, t+1]``. The reported loss is the *token* mean: the sum
of the per-token cross-entropies over all examples divided by the total number of supervised
tokens (not a mean of per-batch or per-example means).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Iterable, Mapping

import torch

from drpost.batch import causal_lm_token_losses
from drpost.data.chat import collate

__all__ = ["perplexity", "iter_batches"]


def _is_batch(x: Any) -> bool:
    return isinstance(x, Mapping) and isinstance(x.get("input_ids"), torch.Tensor) and x["input_ids"].dim() == 2


def iter_batches(batches_or_examples, batch_size: int = 8, pad_id: int | None = None):
    """Yield batch dicts from either batch dicts (tensors ``input_ids``/``labels``
    [/``attention_mask``]) or tokenised examples (``{"input_ids": [...], "labels": [...]}``, as
    made by :func:`drpost.data.chat.tokenize_examples`), collated ``batch_size`` at a time."""
    if _is_batch(batches_or_examples):
        yield batches_or_examples
        return
    items = list(batches_or_examples)
    if not items:
        raise ValueError("perplexity() needs at least one batch or example")
    if all(_is_batch(b) for b in items):
        yield from items
        return
    for n, ex in enumerate(items):
        if not isinstance(ex, Mapping) or "input_ids" not in ex or "labels" not in ex:
            hint = (
                " (raw chat examples: tokenise them with drpost.data.tokenize_examples, or use "
                "evaluate_task)"
                if isinstance(ex, Mapping) and "messages" in ex
                else ""
            )
            raise ValueError(f"item {n} is neither a batch nor a tokenised example with input_ids/labels{hint}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Right padding with attention_mask 0 and label -100: the pad id never influences the loss.
    pad = 0 if pad_id is None else int(pad_id)
    for i in range(0, len(items), int(batch_size)):
        yield collate(items[i : i + int(batch_size)], pad)


@torch.no_grad()
def perplexity(
    model,
    batches_or_examples: Iterable[Mapping[str, Any]] | Mapping[str, Any],
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    pad_id: int | None = None,
) -> dict[str, float]:
    """Token-mean cross-entropy over the supervised tokens.

    Args:
        model: a causal LM returning ``.logits`` (HF) or a bare logits tensor.
        batches_or_examples: batch dicts, a single batch dict, or tokenised examples.
        batch_size: examples per forward pass (ignored for ready-made batches).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under ``torch.autocast``;
            the cross-entropy itself is computed in float32 (float64 for float64 logits) and
            accumulated in float64.
        pad_id: padding id for collation (irrelevant to the result; default 0).

    Returns:
        ``{"loss": total CE / total tokens, "ppl": exp(loss), "tokens": total tokens}``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in iter_batches(batches_or_examples, batch_size, pad_id):
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
            with ctx:
                out = model(input_ids=ids, attention_mask=mask)
            logits = out.logits if hasattr(out, "logits") else out
            losses, supervised = causal_lm_token_losses(logits, {"labels": labels})
            total += float(losses[supervised].double().sum())
            count += int(supervised.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no supervised tokens (every label is -100): nothing to evaluate")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "tokens": count}
