"""TRL's GRPO per-token loss in the form :class:`drpost.DataRegularizer` scores: ``GRPOTokenLoss``
(ratio clipping, the k3 KL term, vLLM's importance ratio, IIF's keep mask, and the per-completion
values of the sequence-mean loss types)."""
from __future__ import annotations

import torch
from trl.trainer.utils import selective_log_softmax

from .trl_grpo_config import SUPPORTED_LOSS_TYPES

__all__ = ["GRPOTokenLoss"]


class GRPOTokenLoss:
    """``loss_fn(logits, batch) -> (losses, mask)`` for :class:`DataRegularizer`: TRL's GRPO per-token loss.

    The batch (built by :meth:`DrPostGRPOTrainer.engine_batch`) has ``input_ids``/``attention_mask``
    (left-padded prompt + right-padded completion), ``labels`` (the completion tokens, -100 elsewhere),
    ``_completion_len`` C, ``advantages`` [N] and optionally ``old_logps``/``ref_logps`` [N, C] (TRL's
    alignment), ``is_ratio`` (vLLM's importance-sampling ratio), ``keep`` [N] (IIF) and ``_per_row`` [N].
    ``_per_row`` false: it returns the per-token losses and the completion mask (the engine then normalises by
    the chosen completions' tokens); true: one value per completion ([N, 1], mask all true):
    its token mean (``grpo``/``sapo``) or token sum / ``max_completion_length`` (``dr_grpo``), so the
    engine divides by the number of chosen completions."""

    def __init__(self, loss_type: str, epsilon_low: float, epsilon_high: float, beta: float, temperature: float,
                 delta: float | None = None, bias_correction_kl: bool = False, max_completion_length: int | None = None,
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05):
        if loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} is not supported; choose one of {', '.join(SUPPORTED_LOSS_TYPES)}")
        self.loss_type, self.eps_low, self.eps_high = loss_type, float(epsilon_low), float(epsilon_high)
        self.beta, self.temperature, self.delta = float(beta), float(temperature), delta
        self.bias_correction_kl, self.max_len = bias_correction_kl, max_completion_length
        self.sapo_pos, self.sapo_neg = sapo_temperature_pos, sapo_temperature_neg
        self.record = None       # a list: the general passes append their monitoring tensors here

    def token_logps(self, logits: torch.Tensor, batch: dict):
        c = int(batch["_completion_len"][0])
        length = batch["input_ids"].shape[1]
        ids = batch["input_ids"][:, length - c:]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits[:, length - c - 1:length - 1].to(dtype) / self.temperature
        mask = batch["labels"][:, length - c:] != -100
        return selective_log_softmax(logits, ids), mask, logits

    def __call__(self, logits: torch.Tensor, batch: dict):
        logps, mask, scaled = self.token_logps(logits, batch)
        adv = batch["advantages"].to(logps.dtype).view(-1, 1)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.to(logps.dtype)
        coef_1 = torch.exp(logps - old)
        ref = batch.get("ref_logps")
        kl = None
        if ref is not None and self.beta != 0.0:
            ref = ref.to(logps.dtype)
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            if self.bias_correction_kl:
                kl = kl * coef_1
        lt = self.loss_type
        if lt == "cispo":
            per_token = -torch.clamp(coef_1, max=self.eps_high).detach() * adv * logps
        elif lt == "sapo":
            temps = torch.where(adv > 0, self.sapo_pos, self.sapo_neg)
            per_token = -(torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps) * adv
        else:
            coef_2 = torch.clamp(coef_1, 1 - self.eps_low, 1 + self.eps_high)
            if self.delta is not None:                 # two-sided clipping (TRL logs its clip ratios after it)
                coef_1 = torch.clamp(coef_1, max=self.delta)
            per_token = -torch.min(coef_1 * adv, coef_2 * adv)
        ratio = batch.get("is_ratio")
        if ratio is not None:
            per_token = per_token * ratio.to(per_token.dtype)
        if kl is not None:
            per_token = per_token + self.beta * kl
        keep = batch.get("keep")
        if keep is not None:
            mask = mask & keep.view(-1, 1).to(torch.bool)
        if self.record is not None:
            with torch.no_grad():
                probs = torch.softmax(scaled, -1)
                entropy = -(probs * torch.log_softmax(scaled, -1)).sum(-1)
                self.record.append({"mask": mask.detach(), "coef_1": coef_1.detach(), "adv": adv.detach(),
                                    "kl": None if kl is None else kl.detach(), "entropy": entropy})
        zero = torch.zeros_like(per_token)
        per_row = batch.get("_per_row")
        if per_row is None or not bool(per_row[0]):
            return torch.where(mask, per_token, zero), mask
        summed = torch.where(mask, per_token, zero).sum(-1, keepdim=True)
        if lt == "dr_grpo":
            value = summed / float(self.max_len)
        else:
            value = summed / mask.sum(-1, keepdim=True).clamp(min=1)
        rows = torch.ones_like(value, dtype=torch.bool) if keep is None else keep.view(-1, 1).to(torch.bool)
        return torch.where(rows, value, torch.zeros_like(value)), rows
