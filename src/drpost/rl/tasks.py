"""Offline RL tasks on the packaged BBC news corpus (2,225 articles, 5 sections).

- ``bbc_category`` (verifiable, RLVR): headline + first words of the article -> its section name;
  reward = exact match of the normalised completion with the section (1 or 0). Answers are 1-2
  tokens. ``balanced=True`` gives every split the five sections in equal shares (round-robin over the
  shuffled sections), so no constant answer scores above 1/5 on the test split (the corpus is 23 %
  sport and 23 % business: a policy collapsing to one answer otherwise looks like progress).
- ``bbc_headline`` (preference, RLHF): first words of the article -> a headline. The reward model
  learns from preference pairs (real headline preferred over a mismatched headline of another
  article, or over the real headline with its words shuffled); the held-out evaluation uses an
  independent scorer, ROUGE-L F1 against the real headline, never the reward model.

Splits are a fixed, seeded shuffle of the de-duplicated articles (the same for every training
seed): ``test`` | ``target`` pool | ``reward model`` pairs (preference task) | ``train`` prompts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from drpost.data.tasks import _bbc_unique, _lead_sentence
from drpost.evaluation.metrics import normalize_answer

SECTIONS = ("business", "entertainment", "politics", "sport", "tech")
CATEGORY_INSTRUCTION = "Classify this BBC news story into one of: business, entertainment, politics, sport, tech.\n\n"
HEADLINE_INSTRUCTION = "Write a short headline for this news story:\n\n"
RL_TASKS = ("bbc_category", "bbc_headline")


@dataclass
class RLTask:
    name: str
    kind: str                      # verifiable | preference
    train: list                    # prompt rows: {"prompt", "answer"/"headline", ...}
    target: list
    test: list
    preference_pairs: list = field(default_factory=list)   # {"prompt", "chosen", "rejected"}

    def summary(self) -> dict:
        return {"task": self.name, "kind": self.kind, "train": len(self.train), "target": len(self.target),
                "test": len(self.test), "preference_pairs": len(self.preference_pairs)}


def _lead(article, words: int) -> str:
    lead = _lead_sentence(article.body)
    text = lead[0] if lead else article.body
    return " ".join(text.split()[:words])


def category_prompt(article, words: int = 25) -> str:
    return f"{CATEGORY_INSTRUCTION}Headline: {article.headline}\n{_lead(article, words)}\n\nCategory:"


def headline_prompt(article, words: int = 30) -> str:
    return HEADLINE_INSTRUCTION + _lead(article, words)


def exact_match_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the normalised completion is exactly the expected answer, else 0.0."""
    return [float(normalize_answer(c) == normalize_answer(a)) for c, a in zip(completions, answer)]


def rouge_l_scorer(prompts, completions, headline, **_) -> list[float]:
    """The independent evaluation scorer of the preference task: ROUGE-L F1 against the real headline."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [sc.score(h, c)["rougeL"].fmeasure for c, h in zip(completions, headline)]


def _check_sizes(n_available: int, **sizes) -> None:
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    need = sum(sizes.values())
    if need > n_available:
        raise ValueError(f"the task splits need {need} articles ({sizes}) but only {n_available} are available")


def _round_robin(articles: list) -> list:
    """The articles reordered section by section (one of each section in turn, in their shuffled order)
    until the smallest section runs out: every prefix of a multiple of 5 is balanced."""
    by_section = {s: [a for a in articles if a.category == s] for s in SECTIONS}
    n = min(len(v) for v in by_section.values())
    return [by_section[s][i] for i in range(n) for s in SECTIONS]


def build_task(name: str, n_train: int = 200, n_target: int = 16, n_test: int = 60, n_pairs: int = 128,
               prompt_words: int = 25, seed: int = 0, balanced: bool = False) -> RLTask:
    """The splits of one task (disjoint articles), deterministic in ``seed``; ``balanced`` (bbc_category
    only): every split has the sections in equal shares (up to the remainder of its size over 5)."""
    if name not in RL_TASKS:
        import difflib
        close = difflib.get_close_matches(name, RL_TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown RL task {name!r}{hint}; choose one of {', '.join(RL_TASKS)}")
    articles = list(_bbc_unique())
    random.Random(f"drpost-rl-{name}-{seed}").shuffle(articles)
    if balanced and name != "bbc_category":
        raise ValueError(f"balanced applies to the bbc_category task (its answers are sections), not {name!r}")
    if name == "bbc_category":
        if balanced:
            articles = _round_robin(articles)
        _check_sizes(len(articles), n_test=n_test, n_target=n_target, n_train=n_train)
        rows = [{"prompt": category_prompt(a, prompt_words), "answer": a.category, "id": a.id} for a in articles]
        return RLTask(name, "verifiable", train=rows[n_test + n_target:n_test + n_target + n_train],
                      target=rows[n_test:n_test + n_target], test=rows[:n_test])
    _check_sizes(len(articles), n_test=n_test, n_target=n_target, n_pairs=n_pairs, n_train=n_train)
    rows = [{"prompt": headline_prompt(a, prompt_words), "headline": a.headline, "id": a.id} for a in articles]
    rng = random.Random(f"drpost-rl-pairs-{seed}")
    start = n_test + n_target
    pair_rows = rows[start:start + n_pairs]
    pairs = []
    for i, r in enumerate(pair_rows):
        if i % 2 == 0:   # mismatched: the headline of another article of the pair split
            other = pair_rows[(i + 1 + rng.randrange(len(pair_rows) - 1)) % len(pair_rows)]["headline"]
        else:            # corrupted: the real headline's words shuffled (or reversed if that changes nothing)
            words = r["headline"].split()
            shuffled = words[:]
            rng.shuffle(shuffled)
            other = " ".join(shuffled if shuffled != words else words[::-1])
        if other == r["headline"]:
            continue
        pairs.append({"prompt": r["prompt"], "chosen": r["headline"], "rejected": other})
    train = rows[start + n_pairs:start + n_pairs + n_train]
    return RLTask(name, "preference", train=train, target=rows[n_test:start], test=rows[:n_test],
                  preference_pairs=pairs)
