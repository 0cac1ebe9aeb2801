"""English question/answer pairs from the ``chatterbot-corpus`` package (BSD-3).

Install with ``pip install --no-deps chatterbot-corpus==1.3.3`` (``./run.sh`` does it). Each
``chatterbot_corpus/data/english/<topic>.yml`` holds ``conversations``: lists of turns; every
pair of consecutive turns is one (question, answer) pair (2,306 in total; a malformed
conversation in trivia.yml that is a bare string instead of a list of turns is skipped).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["QAPair", "load_chatterbot", "chatterbot_data_dir"]


@dataclass(frozen=True)
class QAPair:
    topic: str
    question: str
    answer: str


def chatterbot_data_dir(language: str = "english") -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        data = Path(loc) / "data" / language
        if data.is_dir():
            return data
    raise FileNotFoundError(
        f"The ChatterBot corpus ({language}) comes from the 'chatterbot-corpus' package, which "
        "is not installed. Install it with:\n"
        "    pip install --no-deps chatterbot-corpus==1.3.3   (or run ./run.sh, which installs it)"
    )


def load_chatterbot(topics: list[str] | None = None, language: str = "english") -> list[QAPair]:
    """Load consecutive (question, answer) turn pairs, sorted by topic file then position.

    Turns that are not non-empty strings end a run of pairs (they are never coerced).
    """
    root = chatterbot_data_dir(language)
    files = sorted(root.glob("*.yml"))
    if topics is not None:
        wanted = set(topics)
        files = [f for f in files if f.stem in wanted]
        missing = wanted - {f.stem for f in files}
        if missing:
            raise ValueError(f"Unknown ChatterBot topic(s) {sorted(missing)} in {root}")
    pairs = []
    for f in files:
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list):
                continue
            for q, a in zip(conv, conv[1:]):
                if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                    pairs.append(QAPair(topic=f.stem, question=q.strip(), answer=a.strip()))
    return pairs
