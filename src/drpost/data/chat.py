"""Chat-format SFT examples: validation, tokenisation with assistant-only labels, collation.

An example is a list of messages in the usual "messages" format::

    [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]

:func:`tokenize_chat` renders it with the tokenizer's own chat template and labels only the
assistant replies (each reply's text plus the template's end-of-turn tokens, e.g.
``<|im_end|>\\n`` in ChatML); every other position gets ``IGNORE_INDEX`` (-100). Over-long
examples are shortened by dropping words from the end of the prompt, never by cutting the
reply. :func:`collate` right-pads a list of tokenised examples into HF-style tensors.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = [
    "IGNORE_INDEX",
    "SequenceTooLongError",
    "validate_messages",
    "tokenize_chat",
    "tokenize_examples",
    "encode_prompt",
    "collate",
]

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


class SequenceTooLongError(ValueError):
    """The assistant reply does not fit in ``max_length`` even with a one-word prompt."""


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a "messages" example and return it as a list of plain ``{role, content}`` dicts.

    Raises ``ValueError`` with the offending position for: a non-list, a message that is not a
    mapping, a missing or unknown role, non-string content, a conversation without a user
    turn, or one that does not end with a non-empty assistant reply.
    """
    if isinstance(messages, Mapping) and "messages" in messages:
        messages = messages["messages"]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"message {i} has no 'role' (expected one of {_ROLES})")
        role = m["role"]
        if role not in _ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {_ROLES})")
        if "content" not in m:
            raise ValueError(f"message {i} ({role}) has no 'content'")
        content = m["content"]
        if not isinstance(content, str):
            raise ValueError(
                f"message {i} ({role}) content must be a string, got {type(content).__name__}"
            )
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message is only allowed first")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise ValueError("messages have no 'user' turn")
    if out[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant reply, got role {out[-1]['role']!r}")
    for i, m in enumerate(out):
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"message {i}: empty assistant content")
    return out


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Render and tokenise; label the characters of every assistant turn."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(prompt) and text.startswith(full)):
            raise ValueError(
                "the chat template does not render conversations prefix-consistently; "
                "assistant tokens cannot be located"
            )
        spans.append((len(prompt), len(full)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    return ids, labels


def _trim_words(text: str, keep: int) -> str:
    return "".join(re.findall(r"\s*\S+", text)[:keep])


def tokenize_chat(
    messages: Any,
    tokenizer,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> dict[str, list[int]]:
    """Tokenise one conversation with assistant-only labels.

    Args:
        messages: a "messages" list (or a dict with a ``"messages"`` key).
        tokenizer: a HF tokenizer with a chat template (fast tokenizer: offsets are used).
        max_length: if the rendered conversation is longer, words are dropped from the end of
            the last user message (at least one word is kept). If it still does not fit,
            :class:`SequenceTooLongError` is raised; the assistant reply is never cut.
        system_prompt: prepended as a system turn when given (``None`` keeps the template's
            default behaviour, which for SmolLM2 inserts its own system prompt).

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` (equal lengths; labels are -100 outside
        assistant replies).
    """
    msgs = _with_system(validate_messages(messages), system_prompt)
    ids, labels = _encode(tokenizer, msgs)
    if max_length is None or len(ids) <= max_length:
        return {"input_ids": ids, "labels": labels}

    # Shorten the last user message by words, keeping as many as fit (binary search).
    u = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    n_words = len(re.findall(r"\S+", msgs[u]["content"]))
    lo, hi, best = 1, n_words - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        trial = [dict(m) for m in msgs]
        trial[u]["content"] = _trim_words(msgs[u]["content"], mid)
        t_ids, t_labels = _encode(tokenizer, trial)
        if len(t_ids) <= max_length:
            best, lo = (t_ids, t_labels), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise SequenceTooLongError(
            f"conversation needs more than max_length={max_length} tokens even with a one-word "
            f"prompt ({len(ids)} tokens untrimmed)"
        )
    return {"input_ids": best[0], "labels": best[1]}


def tokenize_examples(
    examples: Iterable[Mapping[str, Any]],
    tokenizer,
    max_length: int | None = None,
    system_prompt: str | None = None,
    drop_too_long: bool = True,
) -> list[dict[str, Any]]:
    """Tokenise examples of the form ``{"messages": [...], **metadata}``.

    Metadata keys (e.g. ``kind``) are kept next to ``input_ids``/``labels``. Examples that
    cannot fit in ``max_length`` are dropped (or re-raise when ``drop_too_long=False``);
    malformed examples always raise ``ValueError``.
    """
    out = []
    for n, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "messages" not in ex:
            raise ValueError(f"example {n} must be a dict with a 'messages' key")
        try:
            tok = tokenize_chat(ex["messages"], tokenizer, max_length, system_prompt)
        except SequenceTooLongError:
            if drop_too_long:
                continue
            raise
        except ValueError as err:
            raise ValueError(f"example {n}: {err}") from err
        meta = {k: v for k, v in ex.items() if k != "messages"}
        out.append({**meta, **tok})
    return out


def encode_prompt(messages: Any, tokenizer, system_prompt: str | None = None) -> list[int]:
    """Token ids of the conversation up to (and including) the assistant generation prompt.

    ``messages`` may end with the reference assistant reply (it is dropped) or with a user
    turn. Used for generation and evaluation.
    """
    msgs = list(messages["messages"] if isinstance(messages, Mapping) else messages)
    if msgs and isinstance(msgs[-1], Mapping) and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    msgs = validate_messages(msgs + [{"role": "assistant", "content": "x"}])[:-1]
    text = _render(tokenizer, _with_system(msgs, system_prompt), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def collate(examples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenised examples into ``input_ids``, ``attention_mask`` and ``labels``.

    Padding positions get ``pad_id`` / 0 / ``IGNORE_INDEX``. Extra keys are ignored.
    """
    if not examples:
        raise ValueError("collate() needs at least one example")
    if pad_id is None:
        raise ValueError("pad_id is None: give the tokenizer a pad token (e.g. its EOS token)")
    width = max(len(ex["input_ids"]) for ex in examples)
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        ids, lab = ex["input_ids"], ex["labels"]
        if len(ids) != len(lab):
            raise ValueError(f"example {i}: input_ids and labels lengths differ ({len(ids)} vs {len(lab)})")
        if len(ids) == 0:
            raise ValueError(f"example {i} is empty")
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
