"""Local chat data: JSONL, JSON, Parquet files and ``datasets.save_to_disk`` directories.

Each row holds either

- ``messages``: a list of ``{"role": "system"|"user"|"assistant", "content": str}`` ending with a
  non-empty assistant reply, or
- ``prompt`` and ``completion``: strings (one user turn, one assistant reply) or, TRL's
  conversational form, lists of messages (the prompt's turns, then the completion's assistant
  turn(s)).

Optional columns: ``source`` (a string grouping rows for splits; default ``<file stem>:<row>``)
and ``kind`` (default: the spec's ``kind``, else the file stem).

Malformed rows (not an object, no ``messages`` nor ``prompt``/``completion``, a missing or unknown
role, no assistant turn at the end, empty content, non-string content, bytes that are not UTF-8,
JSON syntax errors) raise :class:`BadRowError` naming the file and the row (1-based; for JSONL the
line number). With ``on_bad_row="skip"`` they are skipped instead, and one warning on the
``drpost.data`` logger gives their count and the first reasons.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

from drpost.data.chat import validate_messages

__all__ = ["BadRowError", "load_source", "load_spec", "source_kind", "row_to_example", "ON_BAD_ROW"]

logger = logging.getLogger("drpost.data")
ON_BAD_ROW = ("error", "skip")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


class BadRowError(ValueError):
    """A row of a local data file is malformed; the message names the file and the row."""


def source_kind(spec: dict) -> str:
    return str(spec.get("kind") or Path(str(spec["source"])).expanduser().name.split(".")[0] or "source")


# ----------------------------------------------------------------------------- row conversion
def _turns(value: Any, what: str, default_role: str) -> list:
    """A prompt/completion value as a list of messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict) and "role" in value:
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"'{what}' must be a string or a list of messages, got {type(value).__name__}")


def _plain(value: Any) -> Any:
    """numpy arrays / pyarrow scalars from Parquet or datasets -> Python lists and scalars."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def row_to_example(row: Any, kind: str, default_source: str) -> dict:
    """Convert one row to ``{"messages", "kind", "source"}``; ``ValueError`` says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object with 'messages' or 'prompt'/'completion', got {type(row).__name__}")
    row = _plain(row)
    if row.get("messages") is not None:
        messages = row["messages"]
    elif "prompt" in row or "completion" in row:
        missing = [k for k in ("prompt", "completion") if row.get(k) is None]
        if missing:
            raise ValueError(f"has {'prompt' if 'prompt' not in missing else 'completion'} but no '{missing[0]}'")
        messages = _turns(row["prompt"], "prompt", "user") + _turns(row["completion"], "completion", "assistant")
    else:
        raise ValueError(f"no 'messages' column and no 'prompt'/'completion' columns (keys: {sorted(row)})")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and isinstance(m.get("content"), bytes):
            raise ValueError(f"message {i} content is bytes, not text")
    messages = validate_messages(messages)
    for i, m in enumerate(messages):
        if m["role"] != "system" and not m["content"].strip():
            raise ValueError(f"message {i} ({m['role']}): empty content")
    source = row.get("source")
    if source is not None and not isinstance(source, str):
        raise ValueError(f"'source' must be a string, got {type(source).__name__}")
    row_kind = row.get("kind")
    if row_kind is not None and not isinstance(row_kind, str):
        raise ValueError(f"'kind' must be a string, got {type(row_kind).__name__}")
    return {"messages": messages, "kind": row_kind or kind, "source": source or default_source}


# ----------------------------------------------------------------------------- readers
# Each yields (row number for messages, row or an Exception describing why it is unreadable).
def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"line {n}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, ValueError(f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                yield where, ValueError(f"invalid JSON ({err.msg} at column {err.colno})")


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise BadRowError(f"{path}: line {line}: not valid UTF-8 (byte offset {err.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRowError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if "data" in doc and isinstance(doc["data"], list):
            doc = doc["data"]
        elif "messages" in doc or "prompt" in doc:
            doc = [doc]
        elif len(lists) == 1:
            doc = doc[lists[0]]
        else:
            raise BadRowError(f"{path}: a JSON file must hold a list of rows (or an object with one list of rows, "
                              f"e.g. under 'data'); got an object with keys {sorted(doc)[:10]}")
    if not isinstance(doc, list):
        raise BadRowError(f"{path}: a JSON file must hold a list of rows, got {type(doc).__name__}")
    for n, row in enumerate(doc, start=1):
        yield f"row {n}", row


def _read_table(ds) -> Iterator[tuple[str, Any]]:
    for n, row in enumerate(ds, start=1):
        yield f"row {n}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise BadRowError(f"{path}: cannot read as Parquet: {err}") from None
    yield from _read_table(table.to_pylist())


def _read_dataset_dir(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise BadRowError(f"{path}: not a datasets.save_to_disk directory ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            if "train" not in ds and len(names) != 1:
                raise BadRowError(f"{path}: a DatasetDict with splits {names}: choose one with 'split'")
            split = "train" if "train" in ds else names[0]
        if split not in ds:
            raise BadRowError(f"{path}: no split {split!r} (splits: {names})")
        ds = ds[split]
    elif split is not None:
        raise BadRowError(f"{path}: 'split' was given ({split!r}) but the directory holds a single Dataset")
    yield from _read_table(ds)


def _rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        return _read_dataset_dir(path, split)
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet or a "
                         "datasets.save_to_disk directory")
    if split is not None:
        raise ValueError(f"{path}: 'split' only applies to datasets.save_to_disk directories")
    return {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}[fmt](path)


# ----------------------------------------------------------------------------- public API
def load_source(path: str | Path, kind: str | None = None, on_bad_row: str = "error",
                split: str | None = None) -> list[dict]:
    """Load a local file or ``save_to_disk`` directory as chat examples.

    Args:
        path: ``.jsonl``/``.ndjson``, ``.json`` (a list of rows), ``.parquet`` or a directory
            written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
        kind: the examples' ``kind`` (default: the file's stem).
        on_bad_row: ``"error"`` (raise :class:`BadRowError` at the first malformed row) or
            ``"skip"`` (skip them; their count is logged as a warning).
        split: the split of a saved ``DatasetDict`` (default ``train``, or its only split).

    Returns:
        ``[{"messages": [...], "kind": str, "source": str}, ...]`` in file order. Raises
        ``BadRowError`` if nothing usable is left.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    kind = kind or source_kind({"source": str(path)})
    stem = path.name.split(".")[0]
    examples, bad = [], []
    for where, row in _rows(path, split):
        try:
            if isinstance(row, Exception):
                raise row
            examples.append(row_to_example(row, kind, f"{stem}:{where.split()[-1]}"))
        except ValueError as err:
            if on_bad_row == "error":
                raise BadRowError(f"{path}: {where}: {err} (set on_bad_row: skip to skip malformed rows)") from None
            bad.append(f"{where}: {err}")
    if bad:
        shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        logger.warning("%s: skipped %d malformed row(s) of %d (%s)", path, len(bad), len(bad) + len(examples), shown)
    if not examples:
        raise BadRowError(f"{path}: no usable rows" + (f" ({len(bad)} malformed rows skipped)" if bad else ""))
    return examples


def load_spec(spec: dict) -> list[dict]:
    """The examples of a ``{"source": path, ...}`` spec (see :mod:`drpost.data.tasks`)."""
    return load_source(spec["source"], kind=source_kind(spec), on_bad_row=spec.get("on_bad_row") or "error",
                       split=spec.get("split"))
