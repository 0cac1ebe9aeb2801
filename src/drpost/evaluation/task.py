"""One call to evaluate a model on a list of chat examples."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from drpost.data.chat import tokenize_examples, validate_messages
from drpost.evaluation.generation import generate
from drpost.evaluation.metrics import generation_scores
from drpost.evaluation.perplexity import perplexity

__all__ = ["evaluate_task", "METRICS"]

# name -> canonical group
_ALIASES = {
    "ppl": "ppl", "perplexity": "ppl", "loss": "ppl",
    "rouge": "rouge", "rouge1": "rouge", "rouge2": "rouge", "rougeL": "rouge",
    "exact_match": "exact_match", "em": "exact_match",
    "token_f1": "token_f1", "f1": "token_f1",
}
METRICS = tuple(_ALIASES)


def _messages(ex: Any, n: int) -> list[dict[str, str]]:
    msgs = ex["messages"] if isinstance(ex, Mapping) and "messages" in ex else ex
    try:
        return validate_messages(msgs)
    except ValueError as err:
        raise ValueError(f"example {n}: {err}") from err


def evaluate_task(
    model,
    tokenizer,
    examples: Sequence[Any],
    metrics: Sequence[str] = ("ppl", "rougeL"),
    max_new_tokens: int = 32,
    batch_size: int = 8,
    system_prompt: str | None = None,
    max_length: int | None = None,
    first_line: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Evaluate on chat examples whose final assistant turn is the reference.

    Args:
        examples: "messages" lists or ``{"messages": [...], ...}`` dicts.
        metrics: any of ``ppl``/``perplexity``/``loss`` (adds ``loss``, ``ppl``, ``tokens``),
            ``rouge``/``rouge1``/``rouge2``/``rougeL`` (adds all three ROUGE F1s),
            ``exact_match``/``em`` and ``token_f1``/``f1``. Text metrics greedily generate a
            reply to each prompt (:func:`~drpost.evaluation.generation.generate`).
        system_prompt, max_length: as used for training (:func:`drpost.data.chat.tokenize_chat`);
            ``max_length`` only applies to the perplexity sequences (over-long examples are
            dropped there; ``ppl_examples`` counts those kept).
        first_line: keep only the first line of each generated reply.

    Returns:
        A dict with ``n`` (examples) and the requested metrics; with ``return_predictions``
        also ``predictions`` and ``references``.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in _ALIASES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(set(METRICS))}")
    if not metrics:
        raise ValueError("no metrics requested")
    groups = {_ALIASES[m] for m in metrics}
    msgs = [_messages(ex, n) for n, ex in enumerate(examples)]
    if not msgs:
        raise ValueError("evaluate_task() needs at least one example")
    out: dict[str, Any] = {"n": len(msgs)}

    if "ppl" in groups:
        tokenized = tokenize_examples(
            [{"messages": m} for m in msgs], tokenizer, max_length=max_length, system_prompt=system_prompt
        )
        if not tokenized:
            raise ValueError(f"every example is longer than max_length={max_length}")
        res = perplexity(model, tokenized, batch_size, autocast_dtype, pad_id=tokenizer.pad_token_id)
        out.update(res)
        out["ppl_examples"] = len(tokenized)

    if groups & {"rouge", "exact_match", "token_f1"}:
        references = [m[-1]["content"] for m in msgs]
        predictions = generate(
            model, tokenizer, msgs, max_new_tokens=max_new_tokens, batch_size=batch_size,
            progress=progress, first_line=first_line, system_prompt=system_prompt,
        )
        out.update(generation_scores(metrics, predictions, references))
        if return_predictions:
            out["predictions"], out["references"] = predictions, references
    return out
