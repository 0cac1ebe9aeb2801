"""A learned reward model: the policy's own architecture with a scalar head, trained on preference
pairs with the Bradley-Terry loss  -log sigmoid(r(x, y_chosen) - r(x, y_rejected)).

:class:`RewardModel` = a causal LM's decoder stack (``lm.model``, e.g. ``LlamaModel``) + a linear
head read at the last attended token: a sequence-classification head with one output. LoRA
adapters (peft) on the decoder and the head are the only trainable parameters by default.
:class:`RewardModelScorer` turns it into a reward function with TRL's signature.
"""
from __future__ import annotations

import random

import torch
from torch import nn

from drpost.evaluation.generation import encode_prompts, stop_token_ids

from .rollout import build_rows


def scalar_head(backbone: nn.Module, hidden_size: int) -> nn.Linear:
    """A linear hidden -> 1 head in the backbone's dtype (weights N(0, 1/hidden), bias 0): the reward
    model's and the PPO critic's."""
    head = nn.Linear(hidden_size, 1)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / hidden_size ** 0.5)
        head.bias.zero_()
    return head.to(next(backbone.parameters()).dtype)


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = scalar_head(backbone, hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1).clamp_min(1) - 1     # right padding: the last attended token
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return self.head(pooled).squeeze(-1).float()


def reward_model_from_causal_lm(lm: nn.Module, lora_r: int = 8, lora_alpha: float = 16.0,
                                lora_targets=("q_proj", "v_proj")) -> RewardModel:
    """A reward model sharing ``lm``'s decoder weights (``lm`` is consumed: pass a fresh copy).
    With ``lora_r > 0`` only LoRA adapters and the head train; with 0 the whole decoder trains."""
    backbone = getattr(lm, "model", None)
    if backbone is None or not hasattr(lm, "config"):
        raise ValueError("reward_model_from_causal_lm needs a Hugging Face causal LM with a .model decoder")
    if lora_r > 0:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                           target_modules=list(lora_targets)), backbone)
    rm = RewardModel(backbone, lm.config.hidden_size)
    for name, p in rm.named_parameters():
        p.requires_grad_(lora_r == 0 or "lora_" in name or name.startswith("head."))
    if lora_r == 0:
        emb = backbone.get_input_embeddings()
        emb.weight.requires_grad_(False)
    return rm


def encode_pairs(tokenizer, prompts: list, responses: list[str], system_prompt: str | None = "") -> dict:
    """Right-padded (prompt, response + end-of-turn) rows, as the policy's completions are built."""
    stop = stop_token_ids(tokenizer)
    eot = stop[-1] if len(stop) > 1 else stop[0]
    p_ids = encode_prompts(tokenizer, list(prompts), system_prompt)
    r_ids = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) + [eot] for r in responses]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return build_rows(p_ids, r_ids, pad)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def train_reward_model(rm: RewardModel, tokenizer, pairs: list[dict], epochs: int = 1, batch_size: int = 8,
                       lr: float = 1e-3, seed: int = 0, system_prompt: str | None = "", bf16: bool = False,
                       progress: bool = False) -> dict:
    """Bradley-Terry training on ``pairs`` ({prompt, chosen, rejected}); returns the loss/accuracy history."""
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("no preference pairs to train the reward model on")
    for i, p in enumerate(pairs):
        if not all(k in p for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"preference pair {i} needs 'prompt', 'chosen' and 'rejected', got {sorted(p)}")
    params = [p for p in rm.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the reward model has no trainable parameter")
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    dev = next(rm.parameters()).device
    history = []
    rm.train()
    steps = [(e, s) for e in range(epochs) for s in range(0, len(pairs), batch_size)]
    order = list(range(len(pairs)))
    for e, s in tqdm(steps, desc="reward model", disable=not progress):
        if s == 0:
            rng.shuffle(order)
        chunk = [pairs[i] for i in order[s:s + batch_size]]
        prompts = [p["prompt"] for p in chunk] * 2
        rows = encode_pairs(tokenizer, prompts, [p["chosen"] for p in chunk] + [p["rejected"] for p in chunk],
                            system_prompt)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else torch.autocast(dev.type, enabled=False)
        with ctx:
            r = rm(rows["input_ids"].to(dev), rows["attention_mask"].to(dev))
        rc, rr = r[:len(chunk)], r[len(chunk):]
        loss = bradley_terry_loss(rc, rr)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"reward-model loss is {float(loss)} at epoch {e}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"epoch": e, "loss": float(loss.detach()), "accuracy": float((rc > rr).float().mean().detach())})
    rm.eval()
    for p in rm.parameters():
        p.requires_grad_(False)
    return {"history": history, "final_loss": history[-1]["loss"],
            "mean_loss_last_epoch": sum(h["loss"] for h in history if h["epoch"] == epochs - 1) /
            max(1, sum(1 for h in history if h["epoch"] == epochs - 1))}


@torch.no_grad()
def pair_accuracy(rm: RewardModel, tokenizer, pairs: list[dict], batch_size: int = 16,
                  system_prompt: str | None = "") -> float:
    """Share of pairs where r(chosen) > r(rejected)."""
    scorer = RewardModelScorer(rm, tokenizer, batch_size, system_prompt)
    prompts = [p["prompt"] for p in pairs]
    rc = scorer(prompts, [p["chosen"] for p in pairs])
    rr = scorer(prompts, [p["rejected"] for p in pairs])
    return sum(float(a > b) for a, b in zip(rc, rr)) / max(len(pairs), 1)


class RewardModelScorer:
    """A reward function (TRL signature) backed by a trained :class:`RewardModel`."""

    __name__ = "reward_model"

    def __init__(self, rm: RewardModel, tokenizer, batch_size: int = 16, system_prompt: str | None = ""):
        self.rm, self.tokenizer, self.batch_size, self.system_prompt = rm, tokenizer, batch_size, system_prompt

    @torch.no_grad()
    def __call__(self, prompts, completions, **_) -> list[float]:
        dev = next(self.rm.parameters()).device
        out = []
        for s in range(0, len(completions), self.batch_size):
            rows = encode_pairs(self.tokenizer, list(prompts[s:s + self.batch_size]),
                                [c if c else " " for c in completions[s:s + self.batch_size]], self.system_prompt)
            out += self.rm(rows["input_ids"].to(dev), rows["attention_mask"].to(dev)).tolist()
        return out
