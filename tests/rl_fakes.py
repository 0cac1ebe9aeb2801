"""Shared fakes of the RL trainer tests: a tokenizer stand-in and a deterministic sampler."""
import torch

import models_tiny
from drpost.rl.rollout import Rollout


class Tok:
    pad_token_id = models_tiny.PAD_ID


def fake_sample(model, tokenizer, prompts, group_size, max_new_tokens, temperature=1.0, batch_size=32,
                system_prompt="", seed=None, autocast_dtype=None):
    """Deterministic 'generation': completions of 1..max_new_tokens ids drawn from ``seed``."""
    g = torch.Generator().manual_seed(int(seed) % (2 ** 31))
    p_ids, c_ids, texts, flat = [], [], [], []
    for row in prompts:
        for _ in range(group_size):
            n = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
            c = torch.randint(3, models_tiny.VOCAB, (n,), generator=g).tolist()
            p_ids.append(list(row["ids"]))
            c_ids.append(c)
            texts.append(" ".join(map(str, c)))
            flat.append(row)
    return Rollout(prompts=[r["prompt"] for r in flat], prompt_ids=p_ids, completion_ids=c_ids, completions=texts,
                   columns={"answer": [r["answer"] for r in flat]}, group_size=group_size)


def prompt_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": f"p{seed}-{i}", "ids": torch.randint(3, models_tiny.VOCAB, (4,), generator=g).tolist(),
             "answer": i % 2} for i in range(n)]
