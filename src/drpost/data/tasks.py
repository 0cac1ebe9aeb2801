"""The registry of instruction tasks built from the packaged corpora, and task specs.

**Task registry**: ``bbc_headline`` (article -> headline, ROUGE-L),
``bbc_category`` (article -> section name, exact match), ``bbc_continuation`` (40 words -> the
next 20, ROUGE-L), ``bbc_lead`` (article without its first sentence -> that sentence, ROUGE-L) and
``chatterbot_qa`` (question -> answer, token F1). ``task_examples(spec)`` builds a task's examples
``{"messages", "kind", "source"}``; ``task_split(spec, test_size, seed)`` splits them by source
(article / question) into a seeded training and test split. Recipes use them through
:func:`drpost.data.splits.build_sft_data`. BBC duplicates (~130 articles stored twice) are removed
in the registry's tasks.

The example dicts and prompt instructions live in :mod:`drpost.data.examples`.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from difflib import get_close_matches
from functools import lru_cache
from typing import Any, Callable

from drpost.data.bbc import SECTIONS, Article, load_bbc
from drpost.data.chatterbot import QAPair, load_chatterbot
from drpost.data.examples import (CLASSIFY_INSTRUCTION, CONTINUE_INSTRUCTION, LEAD_INSTRUCTION, _example, _excerpt,
                                  headline_prompt)

__all__ = ["headline_prompt"]

# =============================================================================================
# Task registry: instruction tasks built from the packaged corpora
# =============================================================================================
#
# A *task* turns a corpus into chat examples ``{"messages": [user, assistant], "kind": <task
# name>, "source": <document id>}``. The ``source`` is the unit of every split: all examples of
# one BBC article (or of one ChatterBot question, whatever its topic or answer) share it, so a
# train/test split by source never puts the same document on both sides, and the general pool
# can exclude the documents of the target and test splits whatever task it builds from them.
#
# Each task declares its natural evaluation: the generation metrics (names understood by
# drpost.evaluation), a cap on generated tokens, and whether only the first generated line
# counts. ``task_split`` gives a deterministic (seeded) train/test split of any task.

__all__ += [
    "Task",
    "TASKS",
    "TaskSplit",
    "register_task",
    "get_task",
    "task_names",
    "task_examples",
    "task_split",
    "spec_label",
    "check_spec",
    "LEAD_INSTRUCTION",
]

@dataclass(frozen=True)
class Task:
    """A registered instruction task.

    ``build(**options)`` returns every example of the task (list of example dicts, in a fixed
    order). ``options`` maps each accepted option to its default. ``metrics`` are the
    task's natural generation metrics; perplexity is always reported on top of them.
    """

    name: str
    description: str
    build: Callable[..., list]
    options: dict = field(default_factory=dict)
    metrics: tuple = ("rougeL",)
    max_new_tokens: int = 32
    first_line: bool = False


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry (a name can be registered once)."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return sorted(TASKS)


def _did_you_mean(name: str, choices) -> str:
    close = get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}{_did_you_mean(name, TASKS)} (tasks: {', '.join(task_names())})")
    return TASKS[name]


# ------------------------------------------------------------------------------ corpora (cached)
@lru_cache(maxsize=None)
def _bbc_unique() -> tuple:
    """All BBC articles without duplicates: the corpus holds ~130 articles twice (same body or
    same headline under two file names); only the first of each (in file order) is kept, so
    that a duplicate can never sit on both sides of a split."""
    seen_body, seen_head, out = set(), set(), []
    for a in load_bbc():
        if a.body in seen_body or a.headline in seen_head:
            continue
        seen_body.add(a.body)
        seen_head.add(a.headline)
        out.append(a)
    return tuple(out)


@lru_cache(maxsize=None)
def _chatterbot_all() -> tuple:
    return tuple(load_chatterbot())


def _as_tuple(value, what: str) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a name or a list of names, got {value!r}")
    return tuple(value)


def _select(names, exclude, known, what: str) -> tuple:
    names, exclude = _as_tuple(names, what + "s"), _as_tuple(exclude, "exclude_" + what + "s")
    for group in (names or ()), (exclude or ()):
        unknown = [n for n in group if n not in known]
        if unknown:
            hint = _did_you_mean(unknown[0], known)
            raise ValueError(f"unknown {what}(s) {unknown}{hint} (choose from {', '.join(known)})")
    chosen = tuple(n for n in (names if names is not None else known) if n not in set(exclude or ()))
    if not chosen:
        raise ValueError(f"no {what} left to build the task from ({what}s={names}, exclude_{what}s={exclude})")
    return chosen


def _articles(sections, exclude_sections) -> list[Article]:
    chosen = set(_select(sections, exclude_sections, SECTIONS, "section"))
    return [a for a in _bbc_unique() if a.category in chosen]


def _bbc_source(article: Article) -> str:
    return f"bbc/{article.id}"


def _check_words(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


# ------------------------------------------------------------------------------ BBC tasks
def _build_headline(sections=None, exclude_sections=None, words=40) -> list[dict]:
    _check_words(words=words)
    return [_example(headline_prompt(a, words), a.headline, "bbc_headline", _bbc_source(a))
            for a in _articles(sections, exclude_sections)]


def _build_category(sections=None, exclude_sections=None, words=40) -> list[dict]:
    _check_words(words=words)
    return [_example(CLASSIFY_INSTRUCTION + _excerpt(a, 0, words), a.category, "bbc_category", _bbc_source(a))
            for a in _articles(sections, exclude_sections)]


def _build_continuation(sections=None, exclude_sections=None, words=40, continuation_words=20) -> list[dict]:
    _check_words(words=words, continuation_words=continuation_words)
    return [_example(CONTINUE_INSTRUCTION + _excerpt(a, 0, words), _excerpt(a, words, words + continuation_words),
                     "bbc_continuation", _bbc_source(a))
            for a in _articles(sections, exclude_sections) if len(a.words()) >= words + continuation_words]


_SENTENCE = re.compile(r"(.+?[.!?]['\"\u2019\u201d]?)(?:\s+|$)", re.S)


def _lead_sentence(body: str) -> tuple[str, str] | None:
    """(first sentence, rest of the body) of an article, or None if it has no clear first
    sentence (too short or too long to be a lead)."""
    first_par = body.split("\n", 1)[0]
    m = _SENTENCE.match(first_par)
    if not m:
        return None
    sentence = m.group(1).strip()
    if not 5 <= len(sentence.split()) <= 60:
        return None
    rest = body[len(sentence):].strip()
    return (sentence, rest) if rest else None


def _build_lead(sections=None, exclude_sections=None, words=40) -> list[dict]:
    _check_words(words=words)
    out = []
    for a in _articles(sections, exclude_sections):
        split = _lead_sentence(a.body)
        if split is None or len(split[1].split()) < words:
            continue
        prompt = LEAD_INSTRUCTION + " ".join(split[1].split()[:words])
        out.append(_example(prompt, split[0], "bbc_lead", _bbc_source(a)))
    return out


# ------------------------------------------------------------------------------ ChatterBot
_CHATTERBOT_TOPICS: tuple | None = None


def chatterbot_topics() -> tuple:
    global _CHATTERBOT_TOPICS
    if _CHATTERBOT_TOPICS is None:
        _CHATTERBOT_TOPICS = tuple(sorted({p.topic for p in _chatterbot_all()}))
    return _CHATTERBOT_TOPICS


def _question_key(question: str) -> str:
    norm = " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())
    return hashlib.sha1(norm.encode("utf-8")).hexdigest()[:12]


def _build_qa(topics=None, exclude_topics=None) -> list[dict]:
    chosen = set(_select(topics, exclude_topics, chatterbot_topics(), "topic"))
    pairs: list[QAPair] = [p for p in _chatterbot_all() if p.topic in chosen]
    out = []
    for p in pairs:
        # One source per question (normalised), whatever its topic: the corpus repeats questions
        # with several answers, and a split by source keeps all of them on one side.
        out.append(_example(p.question, p.answer, "chatterbot_qa", f"chatterbot/{_question_key(p.question)}"))
    return out


register_task(Task(
    "bbc_headline", "BBC article (first `words` words) -> its headline; ROUGE-L.",
    _build_headline, {"sections": None, "exclude_sections": None, "words": 40},
    metrics=("rougeL",), max_new_tokens=24, first_line=True))
register_task(Task(
    "bbc_category", "BBC article (first `words` words) -> its section name (business, entertainment, "
    "politics, sport, tech); exact match.",
    _build_category, {"sections": None, "exclude_sections": None, "words": 40},
    metrics=("exact_match",), max_new_tokens=6, first_line=True))
register_task(Task(
    "bbc_continuation", "BBC article (first `words` words) -> the next `continuation_words` words; ROUGE-L.",
    _build_continuation, {"sections": None, "exclude_sections": None, "words": 40, "continuation_words": 20},
    metrics=("rougeL",), max_new_tokens=40, first_line=False))
register_task(Task(
    "bbc_lead", "BBC article without its first sentence (next `words` words) -> that first sentence (the "
    "summary lead of BBC style); ROUGE-L.",
    _build_lead, {"sections": None, "exclude_sections": None, "words": 40},
    metrics=("rougeL",), max_new_tokens=64, first_line=True))
register_task(Task(
    "chatterbot_qa", "ChatterBot question -> answer (all answers of a question count as references); "
    "token F1.",
    _build_qa, {"topics": None, "exclude_topics": None},
    metrics=("token_f1",), max_new_tokens=48, first_line=False))


# ------------------------------------------------------------------------------ specs
# A *spec* names one task instance: {"task": name, **options} (or a bare task name), or a local
# file {"source": path, ...} (see drpost.data.sources). Keys that describe how a spec is used
# (count/weight in a general mixture) are not options of the task.
SPEC_USE_KEYS = ("count", "weight")
SOURCE_KEYS = ("source", "kind", "on_bad_row", "split", "metrics", "max_new_tokens", "first_line")


def normalize_spec(spec: Any, where: str = "spec") -> dict:
    if isinstance(spec, str):
        spec = {"task": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a task name or a mapping with 'task' or 'source', got {spec!r}")
    if ("task" in spec) == ("source" in spec):
        raise ValueError(f"{where}: give exactly one of 'task' (a registered task: {', '.join(task_names())}) "
                         f"or 'source' (a local file or dataset directory); got keys {sorted(spec)}")
    return dict(spec)


def check_spec(spec: Any, where: str = "spec", extra_keys: tuple = ()) -> dict:
    """Validate a spec without building it (task name, option names); returns it normalised."""
    spec = normalize_spec(spec, where)
    if "task" in spec:
        try:
            task = get_task(spec["task"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        allowed = ("task", *task.options, *extra_keys)
    else:
        if not isinstance(spec["source"], str) or not spec["source"]:
            raise ValueError(f"{where}: 'source' must be a file or directory path, got {spec['source']!r}")
        allowed = (*SOURCE_KEYS, *extra_keys)
    for key in spec:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}{_did_you_mean(key, allowed)} "
                             f"(allowed: {', '.join(allowed)})")
    return spec


def spec_label(spec: Any) -> str:
    """Short readable name of a spec, e.g. ``bbc_headline[sections=tech]``."""
    spec = normalize_spec(spec)
    head = spec.get("task") or f"source:{spec['source']}"
    opts = {k: v for k, v in spec.items() if k not in ("task", "source", *SPEC_USE_KEYS)}
    if not opts:
        return head

    def fmt(v):
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return head + "[" + ";".join(f"{k}={fmt(v)}" for k, v in opts.items()) + "]"


@dataclass(frozen=True)
class TaskInfo:
    """How a spec's examples are evaluated."""

    kind: str
    metrics: tuple
    max_new_tokens: int
    first_line: bool


def task_info(spec: Any) -> TaskInfo:
    spec = normalize_spec(spec)
    if "task" in spec:
        t = get_task(spec["task"])
        return TaskInfo(t.name, tuple(t.metrics), t.max_new_tokens, t.first_line)
    from drpost.data.sources import source_kind

    metrics = spec.get("metrics") or ("rougeL",)
    return TaskInfo(source_kind(spec), tuple(_as_tuple(metrics, "metrics")), int(spec.get("max_new_tokens") or 64),
                    bool(spec.get("first_line", False)))


def task_examples(spec: Any, **options) -> list[dict]:
    """All examples of a spec (a task name or spec dict; keyword options are added to it)."""
    spec = check_spec(spec, extra_keys=SPEC_USE_KEYS)
    spec.update(options)
    spec = check_spec(spec, extra_keys=SPEC_USE_KEYS)
    if "source" in spec:
        from drpost.data.sources import load_spec

        return load_spec(spec)
    task = get_task(spec["task"])
    kwargs = {k: spec[k] for k in task.options if k in spec}
    try:
        return task.build(**kwargs)
    except ValueError as err:
        raise ValueError(f"{spec_label(spec)}: {err}") from None


@dataclass
class TaskSplit:
    """A deterministic split of one task by source.

    ``train``: every example whose source is not in the test split, in a seeded order (the target
    rows are its first usable examples). ``test``: one example per test source, each with a
    ``references`` list (all answers of that source, e.g. every ChatterBot answer of a question).
    """

    train: list[dict]
    test: list[dict]
    test_sources: set
    label: str


def _stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def task_split(spec: Any, test_size: int, seed: int = 0, examples: list[dict] | None = None) -> TaskSplit:
    """Split a task by source: ``test_size`` sources are held out (seeded by ``seed`` and the task
    name, not by its other options), the rest is the training split."""
    spec = normalize_spec(spec)
    label = spec_label(spec)
    if examples is None:
        examples = task_examples(spec)
    if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
        raise ValueError(f"test_size must be a positive integer, got {test_size!r}")
    by_source: dict[str, list[dict]] = {}
    for ex in examples:
        by_source.setdefault(ex["source"], []).append(ex)
    sources = sorted(by_source)
    if test_size >= len(sources):
        raise ValueError(f"{label} has {len(sources)} distinct sources (articles / questions / rows): too few for a "
                         f"test split of {test_size} plus a training split; lower data.test_size or widen the task")
    name = spec.get("task") or spec.get("source")
    rng = random.Random(_stable_seed("split", name, seed))
    rng.shuffle(sources)
    test_sources = set(sources[:test_size])
    test = []
    for s in sources[:test_size]:
        first = dict(by_source[s][0])
        refs = list(dict.fromkeys(e["messages"][-1]["content"] for e in by_source[s]))
        first["references"] = refs
        test.append(first)
    train = [ex for ex in examples if ex["source"] not in test_sources]
    random.Random(_stable_seed("train-order", name, seed)).shuffle(train)
    return TaskSplit(train=train, test=test, test_sources=test_sources, label=label)
