"""Batches in the Hugging Face causal-LM convention and the per-row losses the engine needs.

A batch is a dict with ``input_ids`` [N, T] (long), optional ``attention_mask`` [N, T] and
``labels`` [N, T] where -100 marks ignored positions; position t predicts ``labels[:, t+1]``
(the shift Hugging Face applies). Every per-sample quantity in drpost is a token *sum*; means
are taken only when gradients are assembled (METHOD §1.6).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# loss_fn(logits, batch) -> (token_losses [N, L], token_mask [N, L] bool)
TokenLossFn = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, torch.Tensor]"]


def causal_lm_token_losses(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy with the causal shift, computed in float32 (or float64).

    Position ``j`` is scored against ``labels[:, j + 1]``; the last position has no next token and
    is masked. The labels are shifted (padded with -100) rather than the logits sliced, so the
    [N, L, vocab] logits are neither copied in forward nor zero-padded in backward."""
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    return losses, labels != IGNORE_INDEX


def supervised_tokens(batch: dict) -> torch.Tensor:
    """T_i for the default causal-LM loss: labels[i, 1:] != -100, as float32 [N]."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).to(torch.float32)


def check_batch(batch, role: str, device: torch.device | None = None) -> dict:
    """Validate a batch and return it with an attention mask. ``role`` is 'general' or 'target'."""
    if not isinstance(batch, dict):
        raise TypeError(f"the {role} batch must be a dict with input_ids/attention_mask/labels, "
                        f"got {type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"the {role} batch has no {key!r}: a batch needs input_ids and labels "
                             f"(-100 marks positions without loss); keys present: {sorted(batch)}")
        if not isinstance(batch[key], torch.Tensor):
            raise TypeError(f"{role} batch[{key!r}] must be a torch.Tensor, got {type(batch[key]).__name__}")
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    for key, t in (("input_ids", ids), ("labels", labels), ("attention_mask", mask)):
        if t.dim() != 2:
            raise ValueError(f"{role} batch[{key!r}] must be 2-D [batch, seq], got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"{role} batch[{key!r}] must hold integers, got dtype {t.dtype}")
        if t.shape != ids.shape:
            raise ValueError(f"{role} batch[{key!r}] has shape {tuple(t.shape)} but input_ids has "
                             f"{tuple(ids.shape)}")
        if device is not None and t.device != device:
            raise ValueError(f"{role} batch[{key!r}] is on {t.device} but the model is on {device}: "
                             "move the batch to the model's device first")
    if ids.shape[0] == 0:
        raise ValueError(f"the {role} batch is empty (0 rows)")
    if ids.shape[1] < 2:
        raise ValueError(f"the {role} batch has sequences of length {ids.shape[1]}: a causal LM needs at least 2 "
                         "positions to supervise a token (labels[:, 1:]); drop empty or one-token examples")
    out = dict(batch)
    out["attention_mask"] = mask
    return out


def require_supervised(tokens: torch.Tensor, role: str) -> None:
    """Raise if a batch has no supervised token at all (one host sync, outside the backward)."""
    if float(tokens.sum()) <= 0:
        hint = ("every label is -100, so there is nothing to learn from it; check the chat template / "
                "label masking (only assistant tokens should be supervised) and truncation")
        raise ValueError(f"the {role} batch has no supervised tokens: {hint}")


def merge_batches(general: dict, target: dict, pad_id: int = 0) -> dict:
    """Rows of the general batch followed by the target rows, right-padded to a common length.
    Extra keys (other than the three standard ones) are concatenated when present in both."""
    length = max(general["input_ids"].shape[1], target["input_ids"].shape[1])

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, length - t.shape[1]), value=value)

    merged = {"input_ids": torch.cat([pad(general["input_ids"], pad_id), pad(target["input_ids"], pad_id)]),
              "attention_mask": torch.cat([pad(general["attention_mask"], 0), pad(target["attention_mask"], 0)]),
              "labels": torch.cat([pad(general["labels"], IGNORE_INDEX), pad(target["labels"], IGNORE_INDEX)])}
    for key in general.keys() & target.keys() - merged.keys():
        a, b = general[key], target[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 1 and a.shape[1:] == b.shape[1:]:
            merged[key] = torch.cat([a, b])
        elif isinstance(a, torch.Tensor) and a.dim() == 2 and b.dim() == 2:
            merged[key] = torch.cat([pad(a, 0), pad(b, 0)])
    return merged


def logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None:
        raise TypeError("the model's forward must return logits or an object with a .logits attribute")
    return logits


def row_losses(model, batch: dict, loss_fn: TokenLossFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the model; return (per-row loss sums [N] float32+, per-row supervised tokens [N] float32)."""
    logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    losses, mask = (loss_fn or causal_lm_token_losses)(logits, batch)
    if losses.shape != mask.shape or losses.shape[0] != batch["input_ids"].shape[0]:
        raise ValueError(f"loss_fn must return (token_losses, mask) of equal shape [N, L]; got "
                         f"{tuple(losses.shape)} and {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    sums = torch.where(mask, losses, torch.zeros_like(losses)).sum(1)
    return sums, mask.sum(1).to(torch.float32)
