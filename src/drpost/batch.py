"""Batches in the Hugging Face causal-LM convention and the per-row losses the engine needs.

A batch is a dict with ``input_ids`` [N, T] (long), optional ``attention_mask`` [N, T] and
``labels`` [N, T] where -100 marks ignored positions; position t predicts ``labels[:, t+1]``
(the shift Hugging Face applies). Every per-sample quantity in drpost is a token *sum*; means
are taken only when gradients are assembled (METHOD §1.6).

A packed (padding-free) batch has ``position_ids`` restarting at each sequence (and/or the
flash-attention ``cu_seq_lens_q/k``) and no ``attention_mask``; then a sample is one sequence
(:mod:`drpost.packing`) and no token predicts across a sequence boundary. Every other key the
model's forward accepts is passed on unchanged (the others are for ``loss_fn``); a key that
cannot follow the rows of a merged batch is an error.
"""
from __future__ import annotations

from typing import Callable

import inspect
import typing
import warnings

import torch
import torch.nn.functional as F

from .packing import FLASH_KEYS, Layout, layout_of

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
    if ids.dim() == 2 and ids.shape[0] > 0:
        layout = layout_of(batch)
        if not layout.identity and mask is not None:
            raise ValueError(f"the {role} batch is packed (position_ids restart inside a row, or cu_seq_lens_q) "
                             "and also has an attention_mask: the attention mask would let the packed "
                             "sequences attend to each other; drop the attention_mask (TRL's padding_free "
                             "collator emits none) or unpack the batch one sequence per row")
    else:
        layout = Layout(max(ids.shape[0], 1), ids.shape[-1], None)
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
    if layout.identity:
        out["attention_mask"] = mask
    out["_layout"] = layout
    return out


def require_supervised(tokens: torch.Tensor, role: str) -> None:
    """Raise if a batch has no supervised token at all (one host sync, outside the backward)."""
    if float(tokens.sum()) <= 0:
        hint = ("every label is -100, so there is nothing to learn from it; check the chat template / "
                "label masking (only assistant tokens should be supervised) and truncation")
        raise ValueError(f"the {role} batch has no supervised tokens: {hint}")


def merge_batches(general: dict, target: dict, pad_id: int = 0) -> dict:
    """Rows of the general batch followed by the target rows, right-padded to a common length.
    Extra keys (other than the standard ones) are concatenated when present in both; a key in
    only one of them cannot be honoured for the other's rows and is an error. If either batch is
    packed the merged one is too: position_ids for every row (a padded row's tail continues its
    positions, so it stays one sample), no attention_mask, cu_seq_lens rebuilt when given."""
    length = max(general["input_ids"].shape[1], target["input_ids"].shape[1])
    internal = {"input_ids", "attention_mask", "labels", "position_ids", "_layout", *FLASH_KEYS}
    only = sorted((general.keys() ^ target.keys()) - internal)
    if only:
        raise ValueError(f"batch key(s) {only} are in only one of the general and the target batch, so the "
                         "merged forward cannot pass them for every row; give both batches the key or "
                         "use target_strategy='separate'")

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, length - t.shape[1]), value=value)

    merged = {"input_ids": torch.cat([pad(general["input_ids"], pad_id), pad(target["input_ids"], pad_id)]),
              "labels": torch.cat([pad(general["labels"], IGNORE_INDEX), pad(target["labels"], IGNORE_INDEX)])}
    packed_ = not (general["_layout"].identity and target["_layout"].identity) if "_layout" in general and \
        "_layout" in target else False
    if packed_:
        merged["position_ids"] = torch.cat([_positions(general, length), _positions(target, length)])
        layout = layout_of(merged)
        merged["_layout"] = layout
        if "cu_seq_lens_q" in general or "cu_seq_lens_q" in target:
            cu, longest = layout.cu_seq_lens(merged["input_ids"].device)
            merged.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if "seq_idx" in general or "seq_idx" in target:     # the sample of every token
            merged["seq_idx"] = layout.sample_of.to(torch.int32)
    else:
        merged["attention_mask"] = torch.cat([pad(general["attention_mask"], 0), pad(target["attention_mask"], 0)])
    for key in general.keys() & target.keys() - internal:
        a, b = general[key], target[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 1 and a.shape[1:] == b.shape[1:]:
            merged[key] = torch.cat([a, b])
        elif isinstance(a, torch.Tensor) and a.dim() == 2 and b.dim() == 2:
            merged[key] = torch.cat([pad(a, 0), pad(b, 0)])
        else:
            raise ValueError(f"batch key {key!r} cannot be merged row-wise (shapes "
                             f"{getattr(a, 'shape', type(a).__name__)} and {getattr(b, 'shape', type(b).__name__)}); "
                             "use target_strategy='separate'")
    return merged


def _positions(batch: dict, length: int) -> torch.Tensor:
    """position_ids [N, length] of one side of a packed merge; padding continues the last position."""
    ids = batch["input_ids"]
    n, t = ids.shape
    pos = batch.get("position_ids")
    if pos is None:
        mask = batch.get("attention_mask")
        if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("a left-padded batch cannot be merged with a packed one: pad on the right "
                             "or use target_strategy='separate'")
        pos = torch.arange(t, device=ids.device).expand(n, t)
    pos = pos.expand(n, t)
    if length > t:
        tail = pos[:, -1:] + 1 + torch.arange(length - t, device=pos.device)
        pos = torch.cat([pos, tail], 1)
    return pos


def logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None:
        raise TypeError("the model's forward must return logits or an object with a .logits attribute")
    return logits


def forward_kwargs(model, batch: dict) -> dict:
    """Every batch key the model's forward accepts, ``labels`` excepted (drpost computes the loss).
    The other keys stay in the batch for ``loss_fn`` (e.g. token weights, RL advantages)."""
    params = _forward_params(model)
    return {k: v for k, v in batch.items()
            if k != "labels" and not k.startswith("_") and (params is None or k in params)}


def _forward_params(model) -> set | None:
    """The keyword names the forward accepts (a PEFT model's: its base model's; a ``**kwargs:
    Unpack[TypedDict]`` adds the TypedDict's keys), or None if it takes any keyword."""
    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    names = set()
    for p in inspect.signature(base.forward).parameters.values():
        if p.kind is not inspect.Parameter.VAR_KEYWORD:
            names.add(p.name)
            continue
        typed = typing.get_args(p.annotation)
        keys = getattr(typed[0], "__optional_keys__", None) if typed else None
        if keys is None:
            return None
        names |= set(keys) | set(typed[0].__required_keys__)
    return names


def _accepts(model, name: str) -> bool:
    params = _forward_params(model)
    return params is None or name in params


_ATTENTION_OK = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_packed_model(model, batch: dict) -> None:
    """Raise if the model's attention cannot keep the packed sequences of ``batch`` apart."""
    params = _forward_params(model)
    if params is not None and "position_ids" not in params:
        raise ValueError(f"the batch is packed but {type(model).__name__}.forward takes no position_ids, so "
                         "its attention cannot keep the packed sequences apart; unpack the batch (one "
                         "sequence per row, with an attention_mask)")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is not None and impl not in _ATTENTION_OK:
        raise ValueError(f"the batch is packed but attn_implementation={impl!r} is not one drpost knows to "
                         f"keep packed sequences apart ({', '.join(_ATTENTION_OK)}); unpack the batch")


_warned_boundary = []


def row_losses(model, batch: dict, loss_fn: TokenLossFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the model; return (per-sample loss sums [S] float32+, per-sample supervised tokens [S]).
    A sample is a row, or one sequence of a packed row."""
    layout = batch.get("_layout") or layout_of(batch)
    if not layout.identity:
        check_packed_model(model, batch)
    kwargs = forward_kwargs(model, batch)
    if not layout.identity and "use_cache" not in kwargs and _accepts(model, "use_cache"):
        # as TRL's SFTTrainer does: with a cache, transformers does not look for packed position_ids
        kwargs["use_cache"] = False
    logits = logits_of(model(**kwargs))
    losses, mask = (loss_fn or causal_lm_token_losses)(logits, batch)
    if losses.shape != mask.shape or losses.shape[0] != batch["input_ids"].shape[0]:
        raise ValueError(f"loss_fn must return (token_losses, mask) of equal shape [N, L]; got "
                         f"{tuple(losses.shape)} and {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    starts = layout.starts_mask()
    if starts is not None and mask.shape != starts.shape:
        raise ValueError(f"a packed batch needs loss_fn to return one loss per token [N, T] = "
                         f"{tuple(starts.shape)}, got {tuple(mask.shape)}")
    if starts is not None:
        # position j predicts token j+1: never across a sequence boundary
        crossing = F.pad(starts[:, 1:], (0, 1), value=False)
        if bool((mask & crossing).any()):
            if not _warned_boundary:
                _warned_boundary.append(True)
                warnings.warn("drpost: the packed batch supervises the first token of a sequence (its label "
                              "is not -100), which would be predicted from the previous sequence; those "
                              "tokens are not scored (TRL's padding_free collator sets them to -100)")
            mask = mask & ~crossing
    sums = layout.sums(torch.where(mask, losses, torch.zeros_like(losses)))
    return sums, layout.sums(mask.to(torch.float32))
