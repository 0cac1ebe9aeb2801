"""Target / test / general splits of a recipe, tokenised into ``datasets.Dataset``s.

:func:`build_sft_data` turns the ``data`` section of a :class:`drpost.config.Config` into

- ``target``: ``n_target`` examples from the target task's own *training* split (its first
  usable examples in a seeded order);
- ``test``: the target task's held-out test split (``test_size`` sources: articles, questions or
  rows), one example per source with every reference answer of that source;
- ``general``: the mixture ``data.general`` (entries with a ``count`` or a ``weight`` sharing
  ``n_general``), drawn without replacement in a seeded order, plus, if ``target_share`` > 0, that
  share of the pool from the target task's training split.

Leak rules: no general example comes from a source (BBC article, ChatterBot question, file row
group) of the target rows or of the test split, whatever its task, and no general entry
contributes examples of the target task itself (same kind and source): those enter the pool
only through ``target_share``.

Over-long examples (more than ``max_seq_length`` tokens): ``overlong: truncate`` shortens the
prompt by words as :func:`drpost.data.chat.tokenize_chat` does (an example whose reply alone
does not fit is dropped), ``overlong: drop`` drops them; both are counted per split and logged.
Every choice is a deterministic function of the data seed.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from drpost.data.chat import SequenceTooLongError, tokenize_chat
from drpost.data.tasks import (
    TaskInfo,
    _stable_seed,
    check_spec,
    spec_label,
    task_examples,
    task_info,
    task_split,
)

__all__ = ["SFTData", "build_sft_data", "ChatTokenizer", "mixture_counts"]

logger = logging.getLogger("drpost.data")
_USE_KEYS = ("count", "weight")


class ChatTokenizer:
    """Tokenise chat examples with a length policy, counting what it truncates and drops."""

    def __init__(self, tokenizer, max_length: int, overlong: str = "truncate", system_prompt: str | None = ""):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        self.tokenizer, self.max_length, self.overlong, self.system_prompt = tokenizer, max_length, overlong, system_prompt
        self.truncated: Counter = Counter()
        self.dropped: Counter = Counter()

    def __call__(self, example: dict, split: str) -> dict | None:
        """``{"input_ids", "labels", "kind", "source"}`` or None if the example was dropped."""
        try:
            tok = tokenize_chat(example["messages"], self.tokenizer, None, self.system_prompt)
            if len(tok["input_ids"]) > self.max_length:
                if self.overlong == "drop":
                    self.dropped[split] += 1
                    return None
                try:
                    tok = tokenize_chat(example["messages"], self.tokenizer, self.max_length, self.system_prompt)
                except SequenceTooLongError:
                    self.dropped[split] += 1
                    return None
                self.truncated[split] += 1
        except SequenceTooLongError:
            self.dropped[split] += 1
            return None
        except ValueError as err:
            raise ValueError(f"{split} example from {example.get('source')!r} ({example.get('kind')}): {err}") from err
        return {"input_ids": tok["input_ids"], "labels": tok["labels"], "kind": example["kind"],
                "source": example["source"]}

    def take(self, examples, n: int | None, split: str) -> tuple[list[dict], list[dict]]:
        """Tokenise in order until ``n`` are kept (all if None): (tokenised, their raw examples)."""
        rows, raw = [], []
        for ex in examples:
            if n is not None and len(rows) >= n:
                break
            row = self(ex, split)
            if row is not None:
                rows.append(row)
                raw.append(ex)
        return rows, raw


def mixture_counts(entries: list[dict], total: int | None) -> list[int]:
    """Examples per entry: ``count`` as given; ``weight`` entries share ``total - sum(counts)``
    proportionally (largest remainders, ties to the earlier entry)."""
    fixed = sum(e["count"] for e in entries if "count" in e)
    weighted = [i for i, e in enumerate(entries) if "count" not in e]
    out = [e.get("count", 0) for e in entries]
    if not weighted:
        return out
    if total is None:
        raise ValueError("data.n_general is null: every general entry needs a 'count'")
    rest = total - fixed
    if rest < 0:
        raise ValueError(f"the general entries' counts add up to {fixed}, more than data.n_general={total}")
    weights = [float(entries[i].get("weight", 1.0)) for i in weighted]
    if sum(weights) <= 0:
        if rest:
            raise ValueError(f"{rest} general examples to share but every weight is 0")
        return out
    shares = [rest * w / sum(weights) for w in weights]
    base = [int(s) for s in shares]
    order = sorted(range(len(shares)), key=lambda j: (-(shares[j] - base[j]), j))
    for j in order[: rest - sum(base)]:
        base[j] += 1
    for i, n in zip(weighted, base):
        out[i] = n
    return out


@dataclass
class SFTData:
    """Tokenised splits (``datasets.Dataset`` with ``input_ids``, ``labels``, ``kind``,
    ``source``) plus the raw test examples (for generation: ``messages`` and ``references``)."""

    target: Any
    test: Any
    general: Any
    test_examples: list
    task: TaskInfo
    stats: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return self.stats


def _as_dataset(rows: list[dict]):
    from datasets import Dataset

    if not rows:
        return Dataset.from_dict({"input_ids": [], "labels": [], "kind": [], "source": []})
    return Dataset.from_list(rows)


def _with_bad_row_default(spec: dict, on_bad_row: str) -> dict:
    if "source" in spec and "on_bad_row" not in spec:
        spec = {**spec, "on_bad_row": on_bad_row}
    return spec


def build_sft_data(cfg, tokenizer) -> SFTData:
    """Build the tokenised target, test and general splits of a recipe.

    Args:
        cfg: a :class:`drpost.config.Config` (its ``data`` section; the seed is ``data.seed``, or
            ``train.seed`` when that is null) or a ``DataConfig`` (seed ``data.seed`` or 0).
        tokenizer: the model's tokenizer (with its chat template).
    """
    d = getattr(cfg, "data", cfg)
    seed = cfg.data_seed if hasattr(cfg, "data_seed") else (d.seed or 0)
    tok = ChatTokenizer(tokenizer, d.max_seq_length, d.overlong, d.system_prompt)

    # ---- target task: split by source, target rows from the training split
    target_spec = _with_bad_row_default(check_spec(d.target, "data.target"), d.on_bad_row)
    label = spec_label(target_spec)
    info = task_info(target_spec)
    all_target = task_examples(target_spec)
    split = task_split(target_spec, d.test_size, seed, examples=all_target)
    target_rows, target_raw = tok.take(split.train, d.n_target, "target")
    if len(target_rows) < d.n_target:
        raise ValueError(
            f"the target task {label} has {len(target_rows)} usable training examples but data.n_target = "
            f"{d.n_target} ({len(split.train)} in its training split after holding out {d.test_size} test sources, "
            f"{tok.dropped['target']} dropped as longer than max_seq_length={d.max_seq_length}): lower data.n_target "
            "or data.test_size, widen the task, or raise data.max_seq_length")
    test_rows, test_raw = tok.take(split.test, None, "test")
    if not test_rows:
        raise ValueError(f"every test example of {label} is longer than max_seq_length={d.max_seq_length}")

    # ---- general pool
    target_sources = {ex["source"] for ex in target_raw}
    banned_sources = split.test_sources | target_sources
    target_keys = {(ex["kind"], ex["source"]) for ex in all_target}
    entries = [check_spec(e, f"data.general[{i}]", extra_keys=_USE_KEYS) for i, e in enumerate(d.general)]
    n_target_like = 0
    if d.target_share > 0:
        if d.n_general is None:
            base = sum(e.get("count", 0) for e in entries)
            n_target_like = round(d.target_share / (1 - d.target_share) * base)
        else:
            n_target_like = round(d.target_share * d.n_general)
    total_other = None if d.n_general is None else d.n_general - n_target_like
    counts = mixture_counts(entries, total_other)

    general_rows: list[dict] = []
    entry_stats, excluded = [], 0
    for i, (entry, count) in enumerate(zip(entries, counts)):
        spec = {k: v for k, v in entry.items() if k not in _USE_KEYS}
        where = f"data.general[{i}] ({spec_label(spec)})"
        if spec == {k: v for k, v in target_spec.items() if k != "on_bad_row"} or spec == target_spec:
            raise ValueError(f"{where} is the target task itself: the general pool excludes it; use "
                             "data.target_share to put a share of target-task examples into the pool")
        spec = _with_bad_row_default(spec, d.on_bad_row)
        pool = task_examples(spec)
        candidates = [ex for ex in pool if ex["source"] not in banned_sources
                      and (ex["kind"], ex["source"]) not in target_keys]
        excluded += len(pool) - len(candidates)
        random.Random(_stable_seed("general", i, spec_label(spec), seed)).shuffle(candidates)
        rows, _ = tok.take(candidates, count, "general")
        if len(rows) < count:
            raise ValueError(
                f"{where} has {len(rows)} usable examples but {count} are requested ({len(pool)} in the task, "
                f"{len(pool) - len(candidates)} excluded as target/test sources or target-task examples, the rest "
                f"dropped as over-long): lower its count/weight or data.n_general")
        general_rows += rows
        entry_stats.append({"entry": spec_label(spec), "requested": count, "taken": len(rows),
                            "available": len(candidates)})
    if n_target_like:
        pool = [ex for ex in split.train if ex["source"] not in target_sources]
        random.Random(_stable_seed("target-share", label, seed)).shuffle(pool)
        rows, _ = tok.take(pool, n_target_like, "general")
        if len(rows) < n_target_like:
            raise ValueError(
                f"data.target_share={d.target_share} needs {n_target_like} target-task examples in the general pool, "
                f"but the training split of {label} has only {len(rows)} left besides the n_target rows: lower "
                "data.target_share or data.n_general")
        general_rows += rows
        entry_stats.append({"entry": f"{label} (target_share)", "requested": n_target_like, "taken": len(rows),
                            "available": len(pool)})
    if not general_rows:
        raise ValueError("the general pool is empty: give data.general entries and a data.n_general > 0")
    random.Random(_stable_seed("general-order", seed)).shuffle(general_rows)

    stats = {
        "target_task": label,
        "seed": seed,
        "target": len(target_rows),
        "test": len(test_rows),
        "general": len(general_rows),
        "general_kinds": dict(sorted(Counter(r["kind"] for r in general_rows).items())),
        "general_entries": entry_stats,
        "general_target_like": n_target_like,
        "excluded_from_general": excluded,
        "max_seq_length": d.max_seq_length,
        "overlong": d.overlong,
        "truncated": dict(tok.truncated),
        "dropped": dict(tok.dropped),
    }
    n_trunc, n_drop = sum(tok.truncated.values()), sum(tok.dropped.values())
    if n_trunc or n_drop:
        logger.warning("over-long examples (> max_seq_length=%d tokens): %d truncated %s, %d dropped %s",
                       d.max_seq_length, n_trunc, dict(tok.truncated), n_drop, dict(tok.dropped))
    logger.info("data: target %s: %d train rows, %d test; general pool %d %s", label, len(target_rows),
                len(test_rows), len(general_rows), stats["general_kinds"])
    test_examples = [{"messages": ex["messages"], "references": ex.get("references")
                      or [ex["messages"][-1]["content"]], "source": ex["source"]} for ex in test_raw]
    return SFTData(target=_as_dataset(target_rows), test=_as_dataset(test_rows), general=_as_dataset(general_rows),
                   test_examples=test_examples, task=info, stats=stats)
