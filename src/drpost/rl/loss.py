"""The per-token policy-gradient loss, in the form :class:`drpost.DataRegularizer` scores.

A policy-gradient row is a causal-LM batch row (``input_ids``, ``attention_mask``, ``labels``
with -100 on the prompt and padding, the completion tokens labelled) plus

- ``advantages`` [N]: the sequence's advantage A_i (GRPO, RLOO) or weight z_i (``reward`` target);
- ``old_logps`` [N, L] (optional): log pi_old of each completion token, aligned with the shifted
  labels (position j holds log pi(labels[j+1])); absent means "the current policy" (ratio 1);
- ``ref_logps`` [N, L] (optional): log pi_ref for the KL penalty; absent means no KL term.

Per completion token t of row i (PPO-clip surrogate, k3 KL estimator as in GRPO/TRL):

    l_{i,t} = -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta (exp(q) - q - 1),
    rho = exp(log pi - log pi_old),  q = log pi_ref - log pi.

The engine sums l over each row's completion tokens (so the per-sample gradient G_i is a token
sum) and divides the chosen samples' summed gradient by their completion-token count: the
token-mean ("DAPO"/``loss_type='dapo'`` in TRL) normalisation of the whole optimisation step,
gradient accumulation included. With ratio 1 and beta 0 the gradient of row i is
-A_i * sum_t grad log pi(y_{i,t}), i.e. the REINFORCE / ``reward`` target-loss direction.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from trl.trainer.utils import selective_log_softmax

from drpost.batch import IGNORE_INDEX, logits_of


def shifted_labels(batch: dict) -> torch.Tensor:
    """labels[:, j + 1] at position j (-100 at the last position): the tokens the logits predict."""
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


def token_logps(logits: torch.Tensor, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi of every labelled next token [N, L] (0 elsewhere), mask [N, L]) in float32 or wider."""
    target = shifted_labels(batch)
    mask = target != IGNORE_INDEX
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    logps = selective_log_softmax(logits, target.clamp_min(0))
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


@torch.no_grad()
def policy_logps(model, batch: dict, temperature: float = 1.0, micro_batch: int | None = None,
                 autocast_dtype=None) -> torch.Tensor:
    """log pi of the completion tokens under ``model`` (no gradient), in chunks of ``micro_batch`` rows."""
    n = batch["input_ids"].shape[0]
    step = micro_batch or n
    out = []
    device = next(model.parameters()).device
    for s in range(0, n, step):
        chunk = {k: v[s:s + step] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with ctx:
            logits = logits_of(model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]))
        out.append(token_logps(logits, chunk, temperature)[0])
    return torch.cat(out)


class PolicyLoss:
    """``loss_fn(logits, batch) -> (per-token losses [N, L], completion mask [N, L])`` for the engine.

    Args:
        clip_eps: PPO clipping range epsilon of the ratio (inactive when ``old_logps`` is absent).
        beta: KL coefficient (used on rows that carry ``ref_logps``).
        temperature: the sampling temperature; logits are divided by it (as TRL does).
    """

    def __init__(self, clip_eps: float = 0.2, beta: float = 0.0, temperature: float = 1.0):
        if not clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
        if beta < 0:
            raise ValueError(f"beta (the KL coefficient) must be >= 0, got {beta}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.clip_eps, self.beta, self.temperature = float(clip_eps), float(beta), float(temperature)
        self.kl_sum, self.kl_tokens = 0.0, 0.0   # k3 KL seen by the forwards since reset_kl() (monitoring)

    def reset_kl(self) -> None:
        self.kl_sum, self.kl_tokens = 0.0, 0.0

    @property
    def kl(self) -> float:
        return self.kl_sum / self.kl_tokens if self.kl_tokens else float("nan")

    def __call__(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "advantages" not in batch:
            raise ValueError("a policy-gradient batch needs 'advantages' [N] (one value per completion)")
        logps, mask = token_logps(logits, batch, self.temperature)
        adv = batch["advantages"].to(logps.dtype).view(-1, 1)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.to(logps.dtype)
        ratio = torch.exp(logps - old)
        clipped = torch.clamp(ratio, 1.0 - self.clip_eps, 1.0 + self.clip_eps)
        loss = -torch.minimum(ratio * adv, clipped * adv)
        ref = batch.get("ref_logps")
        if ref is not None and self.beta > 0:
            q = ref.to(logps.dtype) - logps
            kl = torch.exp(q) - q - 1.0
            loss = loss + self.beta * kl
            with torch.no_grad():
                self.kl_sum += float((kl * mask).sum())
                self.kl_tokens += float(mask.sum())
        return torch.where(mask, loss, torch.zeros_like(loss)), mask


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean k3 KL(pi || pi_ref) estimate over the completion tokens (a float tensor)."""
    q = ref_logps - logps
    kl = torch.exp(q) - q - 1.0
    return (kl * mask).sum() / mask.sum().clamp_min(1)
