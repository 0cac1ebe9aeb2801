"""Chat examples built from the packaged corpora: the example dict every task and split uses, and
the instructions of the BBC prompts."""
from __future__ import annotations

from drpost.data.bbc import Article

HEADLINE_INSTRUCTION = "Write a headline for this news article:\n"
CLASSIFY_INSTRUCTION = (
    "Which section of the BBC website is this article from: business, entertainment, "
    "politics, sport or tech?\n"
)
CONTINUE_INSTRUCTION = "Continue this news article:\n"
LEAD_INSTRUCTION = "Write the opening sentence of this news article, given the text that follows it:\n"


def _excerpt(article: Article, start: int, stop: int) -> str:
    return " ".join(article.words()[start:stop])


def headline_prompt(article: Article, words: int = 40) -> str:
    return HEADLINE_INSTRUCTION + _excerpt(article, 0, words)


def _example(prompt: str, answer: str, kind: str, source: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        "kind": kind,
        "source": source,
    }
