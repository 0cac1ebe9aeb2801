"""Sampling completions from the current policy and turning them into policy-gradient rows.

A prompt row is a dict with ``prompt`` (a string, one user turn, or a "messages" list) and any
extra columns (e.g. ``answer``) that the reward functions receive. :func:`sample` draws
``group_size`` completions per prompt (consecutive rows form a group), cut after the first stop
token (the stop token is part of the completion: the policy learns to stop).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from drpost.batch import IGNORE_INDEX
from drpost.evaluation.generation import encode_prompts, stop_token_ids


@dataclass
class Rollout:
    prompts: list              # one per completion (prompt strings or messages), repeated per group
    prompt_ids: list           # list[list[int]] per completion
    completion_ids: list       # list[list[int]] per completion (stop token included when generated)
    completions: list          # decoded completions (stop token and special tokens removed)
    columns: dict = field(default_factory=dict)   # extra prompt fields, one value per completion
    group_size: int = 1

    def __len__(self) -> int:
        return len(self.completion_ids)

    def rows(self, pad_id: int) -> dict:
        return build_rows(self.prompt_ids, self.completion_ids, pad_id)

    def completion_lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completion_ids], dtype=torch.float64)


def build_rows(prompt_ids: list, completion_ids: list, pad_id: int) -> dict:
    """Right-padded rows prompt + completion; labels are the completion tokens (-100 elsewhere)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    if not completion_ids:
        raise ValueError("no completions: a rollout needs at least one prompt and one completion")
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if len(c) == 0:
            raise ValueError(f"completion {i} is empty (0 tokens): a policy-gradient sample needs at least one "
                             "generated token; check max_new_tokens (>= 1) and how the completions were built")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens)")
    length = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    n = len(prompt_ids)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        row = list(p) + list(c)
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(p):len(row)] = torch.tensor(list(c))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def sample(model, tokenizer, prompt_rows: list[dict], group_size: int, max_new_tokens: int,
           temperature: float = 1.0, batch_size: int = 32, system_prompt: str | None = "",
           seed: int | None = None, autocast_dtype=None) -> Rollout:
    """``group_size`` sampled completions (temperature, no top-k/top-p) for every prompt row."""
    from transformers import GenerationConfig

    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not prompt_rows:
        raise ValueError("no prompts to roll out")
    for i, row in enumerate(prompt_rows):
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"prompt row {i} must be a dict with a 'prompt' key, got {row!r:.80}")
    encoded = encode_prompts(tokenizer, [r["prompt"] for r in prompt_rows], system_prompt)
    stops = stop_token_ids(tokenizer)
    stop_set = set(stops)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    cfg = GenerationConfig(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0, num_beams=1,
                           max_new_tokens=int(max_new_tokens), min_new_tokens=1, eos_token_id=stops,
                           pad_token_id=pad_id, repetition_penalty=1.0, use_cache=True)
    device = next(model.parameters()).device
    flat = [i for i in range(len(prompt_rows)) for _ in range(group_size)]
    was_training = model.training
    saved = getattr(model, "generation_config", None)
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    completion_ids: list = [None] * len(flat)
    try:
        if saved is not None:
            model.generation_config = GenerationConfig()
        for start in range(0, len(flat), batch_size):
            rows = flat[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(rows), width), dtype=torch.long)
            for k, i in enumerate(rows):       # left padding for generation
                ids[k, width - len(encoded[i]):] = torch.tensor(encoded[i])
                att[k, width - len(encoded[i]):] = 1
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
            with ctx:
                out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=cfg)
            for k, new in enumerate(out[:, width:].tolist()):
                cut = next((j for j, t in enumerate(new) if t in stop_set), None)
                completion_ids[start + k] = new[:cut + 1] if cut is not None else new
    finally:
        if saved is not None:
            model.generation_config = saved
        model.train(was_training)
    texts = [tokenizer.decode([t for t in c if t not in stop_set], skip_special_tokens=True).strip()
             for c in completion_ids]
    keys = [k for k in prompt_rows[0] if k != "prompt"]
    columns = {k: [prompt_rows[i].get(k) for i in flat] for k in keys}
    return Rollout(prompts=[_prompt_text(prompt_rows[i]["prompt"]) for i in flat],
                   prompt_ids=[list(encoded[i]) for i in flat], completion_ids=completion_ids,
                   completions=texts, columns=columns, group_size=group_size)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    msgs = prompt["messages"] if isinstance(prompt, dict) else prompt
    return "\n".join(m.get("content", "") for m in msgs if m.get("role") == "user")
