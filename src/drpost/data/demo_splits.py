"""The demo's splits (:func:`headline_splits`, used by ``drpost demo``): BBC *tech* article ->
headline, with an imperfectly aligned general pool.

This is the "Follow-up" setup of the feasibility probe:

- **target** (``n_target``) and **test** (``n_test``): disjoint tech articles, prompt
  ``"Write a headline for this news article:\\n" + first 40 words``, answer = the headline;
- **general pool** (``n_general``, shuffled): ~10 % headline examples from the four other
  sections (same prompt), and the rest split evenly between section classification,
  ChatterBot question/answer pairs and article continuation (40 words -> next 20 words).

No tech article of the target or test split appears anywhere in the general pool. Every
split is a deterministic function of ``seed``.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from drpost.data.bbc import SECTIONS, Article, load_bbc
from drpost.data.chatterbot import load_chatterbot
from drpost.data.examples import CLASSIFY_INSTRUCTION, CONTINUE_INSTRUCTION, _example, _excerpt, headline_prompt

__all__ = ["DemoSplits", "headline_splits", "headline_prompt", "TARGET_SECTION"]

TARGET_SECTION = "tech"


def _headline(article: Article, words: int) -> dict:
    return _example(headline_prompt(article, words), article.headline, "headline", article.id)


@dataclass
class DemoSplits:
    """Examples are dicts ``{"messages": [...], "kind": str, "source": str}``."""

    target: list[dict]
    test: list[dict]
    general: list[dict]
    seed: int = 0
    notes: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "target": len(self.target),
            "test": len(self.test),
            "general": len(self.general),
            "general_kinds": dict(sorted(Counter(ex["kind"] for ex in self.general).items())),
            "seed": self.seed,
        }


def _even_split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def headline_splits(
    n_target: int = 16,
    n_test: int = 100,
    n_general: int = 1000,
    seed: int = 0,
    words: int = 40,
    headline_frac: float = 0.10,
    continuation_words: int = 20,
) -> DemoSplits:
    """Build the demo's target, test and general splits (see the module docstring)."""
    if min(n_target, n_test) < 1 or n_general < 0:
        raise ValueError("n_target and n_test must be >= 1 and n_general >= 0")
    if not 0.0 <= headline_frac <= 1.0:
        raise ValueError("headline_frac must be in [0, 1]")
    rng = random.Random(seed)
    by_section = {s: load_bbc([s]) for s in SECTIONS}
    for arts in by_section.values():
        rng.shuffle(arts)

    tech = by_section[TARGET_SECTION]
    if n_target + n_test > len(tech):
        raise ValueError(f"only {len(tech)} tech articles for n_target + n_test = {n_target + n_test}")
    target = [_headline(a, words) for a in tech[:n_target]]
    test = [_headline(a, words) for a in tech[n_target : n_target + n_test]]

    # General pool: headline rows from the other sections, then the three off-task kinds.
    others = [s for s in SECTIONS if s != TARGET_SECTION]
    n_head = round(headline_frac * n_general)
    n_cls, n_chat, n_cont = _even_split(n_general - n_head, 3)
    general, used = [], set()
    for section, k in zip(others, _even_split(n_head, len(others))):
        for a in by_section[section][:k]:
            general.append(_headline(a, words))
            used.add(a.id)

    # Articles free for classification/continuation: never a target/test tech article.
    free = [a for s in others for a in by_section[s] if a.id not in used]
    free += tech[n_target + n_test :]
    rng.shuffle(free)
    long_enough = words + continuation_words
    cont_pool = [a for a in free if len(a.words()) >= long_enough]
    if n_cont > len(cont_pool):
        raise ValueError(f"n_general={n_general} needs {n_cont} continuation articles, have {len(cont_pool)}")
    cont = cont_pool[:n_cont]
    cont_ids = {a.id for a in cont}
    cls_pool = [a for a in free if a.id not in cont_ids]
    if n_cls > len(cls_pool):
        raise ValueError(f"n_general={n_general} needs {n_cls} classification articles, have {len(cls_pool)}")
    for a in cont:
        general.append(
            _example(
                CONTINUE_INSTRUCTION + _excerpt(a, 0, words),
                _excerpt(a, words, long_enough),
                "continuation",
                a.id,
            )
        )
    for a in cls_pool[:n_cls]:
        general.append(
            _example(CLASSIFY_INSTRUCTION + _excerpt(a, 0, words), a.category, "classification", a.id)
        )

    qa = load_chatterbot()
    rng.shuffle(qa)
    if n_chat > len(qa):
        raise ValueError(f"n_general={n_general} needs {n_chat} chat pairs, have {len(qa)}")
    for i, p in enumerate(qa[:n_chat]):
        general.append(_example(p.question, p.answer, "chat", f"chatterbot/{p.topic}/{i}"))

    rng.shuffle(general)
    return DemoSplits(
        target=target,
        test=test,
        general=general,
        seed=seed,
        notes={"words": words, "headline_frac": headline_frac},
    )
