"""Batched greedy generation with the training chat template.

Prompts are encoded by :func:`drpost.data.chat.encode_prompt`, the function whose output is,
token for token, the prefix of the training sequence built by
:func:`~drpost.data.chat.tokenize_chat` (same chat template, no extra special tokens such as a
BOS). Encoding generation prompts differently from training (e.g. with a BOS prepended) is the
train/eval mismatch of METHOD §9.16, as is leaving ``do_sample`` to the checkpoint's generation
config: here decoding is always greedy, from a generation config built from scratch.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from drpost.data.chat import encode_prompt

__all__ = ["generate", "generate_ids", "encode_prompts", "stop_token_ids"]

# End-of-turn markers of common chat templates (used when present in the vocabulary).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: the EOS token, the chat template's end-of-turn token (found by
    rendering a short conversation), and known end-of-turn markers present in the vocabulary."""
    ids: list[int] = []

    def add(i):
        if isinstance(i, int) and i >= 0 and i not in ids:
            ids.append(i)

    eos = tokenizer.eos_token_id
    for i in eos if isinstance(eos, (list, tuple)) else [eos]:
        add(i)
    # The first token the template writes after an assistant reply (e.g. "<|im_end|>").
    mark = "drpostreplymarker"
    try:
        user = [{"role": "user", "content": "hi"}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": mark}], tokenize=False
        )
        if full.startswith(prompt + mark):
            suffix = full[len(prompt) + len(mark):]
            first = tokenizer(suffix, add_special_tokens=False)["input_ids"][:1]
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
            if first and first[0] in special:
                add(first[0])
    except Exception:  # a template that cannot render this probe: rely on the names below
        pass
    vocab = tokenizer.get_vocab()
    for name in _END_OF_TURN:
        if name in vocab:
            add(vocab[name])
    if not ids:
        raise ValueError("the tokenizer has no EOS or end-of-turn token to stop generation at")
    return ids


def _as_prompt_list(prompts_or_messages) -> list:
    if isinstance(prompts_or_messages, (str, bytes)):
        raise ValueError("generate() takes a list of prompts; wrap a single prompt in a list")
    items = list(prompts_or_messages)
    if items and isinstance(items[0], Mapping) and "role" in items[0]:
        raise ValueError(
            "got one conversation (a list of messages); pass a list of conversations, "
            "e.g. [messages]"
        )
    return items


def encode_prompts(tokenizer, prompts_or_messages, system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each prompt, exactly as training encodes the prefix of a conversation.

    An item may be a string (one user turn), a "messages" list or a ``{"messages": [...]}`` dict
    (a final assistant turn, the reference, is dropped), or a list of token ids (used as is).
    """
    out = []
    for n, item in enumerate(_as_prompt_list(prompts_or_messages)):
        if isinstance(item, str):
            item = [{"role": "user", "content": item}]
        if isinstance(item, torch.Tensor):
            item = item.tolist()
        if isinstance(item, (list, tuple)) and item and all(isinstance(t, int) for t in item):
            out.append(list(item))
            continue
        try:
            out.append(encode_prompt(item, tokenizer, system_prompt=system_prompt))
        except ValueError as err:
            raise ValueError(f"prompt {n}: {err}") from err
    return out


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _left_pad(tokenizer, rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad with the tokenizer (its padding side is "left" here); by hand with ``pad_id``
    when it has no pad token."""
    if tokenizer.pad_token_id is not None:
        batch = tokenizer.pad([{"input_ids": r} for r in rows], padding=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts_or_messages: Sequence[Any],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
    system_prompt: str | None = None,
    stop_ids: Iterable[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations as token ids, cut before the first stop token (which is excluded).

    See :func:`generate` for the arguments. Each returned list has at most ``max_new_tokens`` ids.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_prompts(tokenizer, prompts_or_messages, system_prompt)
    if not encoded:
        return []
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt encodes to zero tokens")
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    stop_set = set(stops)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    # Built from scratch: nothing comes from the checkpoint's generation config (which may
    # sample, penalise repetitions, force tokens, ...).
    gen_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=0,
        eos_token_id=stops,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        use_cache=True,
    )
    # Rows are processed longest first (less padding); results go back in input order.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[list[int] | None] = [None] * len(encoded)
    device = _device(model)

    was_training, padding_side = model.training, tokenizer.padding_side
    saved_config = getattr(model, "generation_config", None)
    model.eval()
    tokenizer.padding_side = "left"
    if saved_config is not None:
        model.generation_config = GenerationConfig()  # nothing inherited from the checkpoint
    try:
        starts = range(0, len(order), int(batch_size))
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress):
            rows = order[start : start + int(batch_size)]
            input_ids, attention_mask = _left_pad(tokenizer, [encoded[i] for i in rows], pad_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config
            )
            new = out[:, input_ids.shape[1]:].tolist()
            for i, ids in zip(rows, new):
                cut = next((k for k, t in enumerate(ids) if t in stop_set), len(ids))
                results[i] = ids[:cut]
    finally:
        tokenizer.padding_side = padding_side
        if saved_config is not None:
            model.generation_config = saved_config
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate(model, tokenizer, prompts_or_messages: Sequence[Any], max_new_tokens: int = 32, batch_size: int = 8,
             progress: bool = True, first_line: bool = False, system_prompt: str | None = None,
             stop_ids: Iterable[int] | None = None) -> list[str]:
    """Greedy replies to a list of prompts, decoded and stripped.

    Args:
        model: a Hugging Face causal LM (anything with ``.generate``).
        tokenizer: its tokenizer, with the chat template used for training.
        prompts_or_messages: a list whose items are strings (one user turn each), "messages"
            lists or ``{"messages": [...]}`` dicts (a trailing assistant reply is dropped), or
            token-id lists (used as given).
        max_new_tokens: at most this many new tokens per prompt.
        batch_size: prompts per ``generate`` call (left-padded).
        progress: show a tqdm bar over batches.
        first_line: keep only the first line of each reply.
        system_prompt: as for :func:`drpost.data.chat.tokenize_chat`; pass the value used for
            training so that the prompts match.
        stop_ids: tokens that end a reply (default: :func:`stop_token_ids`).

    The model runs in eval mode under ``torch.no_grad()`` (its train/eval mode, the tokenizer's
    padding side and the model's generation config are restored afterwards). Only the new
    tokens are decoded, up to the first stop token, with special tokens skipped.
    """
    ids = generate_ids(
        model, tokenizer, prompts_or_messages, max_new_tokens, batch_size, progress, system_prompt, stop_ids
    )
    texts = []
    for row in ids:
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        if first_line:
            text = text.split("\n", 1)[0].strip()
        texts.append(text)
    return texts
