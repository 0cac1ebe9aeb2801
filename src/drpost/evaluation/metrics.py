"""Text metrics: ROUGE (via ``rouge_score``), SQuAD-style exact match and token F1.

Every function takes a list of predictions and a list of references of the same non-zero
length and returns the mean over examples, in [0, 1]. A reference may also be a list of
acceptable strings; the example then scores the best of them (SQuAD convention).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence, Union

__all__ = ["normalize_answer", "rouge", "exact_match", "token_f1", "generation_scores", "ROUGE_KEYS"]

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
Reference = Union[str, Sequence[str]]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse
    whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check(predictions, references) -> tuple[list[str], list[list[str]]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be lists of strings, not a single string")
    predictions, references = list(predictions), list(references)
    if not predictions or not references:
        raise ValueError(
            f"metrics need at least one example (got {len(predictions)} predictions and "
            f"{len(references)} references)"
        )
    if len(predictions) != len(references):
        raise ValueError(
            f"length mismatch: {len(predictions)} predictions vs {len(references)} references"
        )
    refs = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise ValueError(f"prediction {i} must be a string, got {type(p).__name__}")
        r = [r] if isinstance(r, str) else list(r)
        if not r or not all(isinstance(x, str) for x in r):
            raise ValueError(f"reference {i} must be a string or a non-empty list of strings")
        refs.append(r)
    return predictions, refs


def rouge(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (``rouge_score``, Porter stemming on) -> ``{"rouge1", "rouge2", "rougeL"}``."""
    from rouge_score import rouge_scorer

    predictions, refs = _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, refs):
        # rouge_score takes (target, prediction); with several references keep the best F1 per key.
        for key in ROUGE_KEYS:
            totals[key] += max(scorer.score(r, pred)[key].fmeasure for r in ref)
    return {key: totals[key] / len(predictions) for key in ROUGE_KEYS}


def _f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:  # SQuAD v2 convention: two empty answers agree
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Share of predictions equal to (one of) their reference(s) after :func:`normalize_answer`."""
    predictions, refs = _check(predictions, references)
    hits = sum(
        any(normalize_answer(p) == normalize_answer(r) for r in ref) for p, ref in zip(predictions, refs)
    )
    return hits / len(predictions)


def token_f1(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean SQuAD token-overlap F1 (bag of normalised words; best reference per example)."""
    predictions, refs = _check(predictions, references)
    return sum(max(_f1(p, r) for r in ref) for p, ref in zip(predictions, refs)) / len(predictions)


_GROUP = {"rouge": "rouge", "rouge1": "rouge", "rouge2": "rouge", "rougeL": "rouge",
          "exact_match": "exact_match", "em": "exact_match", "token_f1": "token_f1", "f1": "token_f1"}


def generation_scores(names, predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """The generation metrics named in ``names`` (aliases: rouge*/em/f1; other names ignored)."""
    groups = {_GROUP.get(n) for n in names}
    out: dict[str, float] = {}
    if "rouge" in groups:
        out.update(rouge(predictions, references))
    if "exact_match" in groups:
        out["exact_match"] = exact_match(predictions, references)
    if "token_f1" in groups:
        out["token_f1"] = token_f1(predictions, references)
    return out
