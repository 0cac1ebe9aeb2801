"""Evaluation: text metrics, greedy generation and perplexity, with train/eval-consistent prompts.

- :mod:`~drpost.evaluation.metrics`: ROUGE-1/2/L F1, SQuAD exact match and token F1.
- :mod:`~drpost.evaluation.generation`: batched greedy decoding of chat prompts encoded exactly
  as in training.
- :mod:`~drpost.evaluation.perplexity`: token-mean cross-entropy over assistant tokens.
- :func:`evaluate_task`: all of the above for a list of chat examples.
"""

from drpost.evaluation.generation import encode_prompts, generate, generate_ids, stop_token_ids
from drpost.evaluation.metrics import exact_match, normalize_answer, rouge, token_f1
from drpost.evaluation.perplexity import perplexity
from drpost.evaluation.task import evaluate_task

__all__ = [
    "rouge",
    "exact_match",
    "token_f1",
    "normalize_answer",
    "generate",
    "generate_ids",
    "encode_prompts",
    "stop_token_ids",
    "perplexity",
    "evaluate_task",
]
