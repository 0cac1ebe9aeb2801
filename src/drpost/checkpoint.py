"""Crash-safe checkpoint folders: staged writes, an atomic rename, a manifest of checksums.

A checkpoint ``<run_dir>/checkpoint-N/`` is written in three moves:

1. every file goes into a staging folder ``<run_dir>/.tmp-checkpoint-N/`` (a name the Trainer's
   ``checkpoint-*`` globs never match);
2. :func:`write_manifest` records the size and SHA-256 of every file in ``drpost_manifest.json``
   (written last, through a temporary file and ``os.replace``) and the files are fsync'ed;
3. :func:`publish` renames the staging folder to ``checkpoint-N`` (atomic on POSIX filesystems).

A process killed at any moment therefore leaves either no ``checkpoint-N`` or a complete one.
Older checkpoints are deleted only after the new one is published, by renaming them out of the way
first (:func:`rotate`), so there is always a complete checkpoint to go back to.

On resume, :func:`last_valid_checkpoint` walks the ``checkpoint-N`` folders from the newest down
and returns the first whose manifest verifies; every rejected folder is reported (what is wrong:
no manifest, a missing file, a size or checksum mismatch), so a checkpoint corrupted or truncated
after it was written (a full disk, a bad copy, bit rot) is detected and the previous one is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

MANIFEST_NAME = "drpost_manifest.json"
STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or corrupted, or no usable checkpoint exists."""


# ------------------------------------------------------------------------------------ files
def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f"{STAGING_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(folder: str | Path, step: int | None = None) -> dict:
    """Checksum every file of ``folder`` (recursively), fsync them and write the manifest last."""
    folder = Path(folder)
    entries = {}
    for p in _files(folder):
        _fsync_file(p)
        entries[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format": _FORMAT, "step": step, "files": entries}
    atomic_write_bytes(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def verify(folder: str | Path) -> list[str]:
    """What is wrong with a checkpoint folder: an empty list when its manifest verifies."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a directory"]
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return [f"no {MANIFEST_NAME} (the write was interrupted, or the folder was not written by drpost)"]
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"unreadable {MANIFEST_NAME} ({e})"]
    problems = []
    for name, entry in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            problems.append(f"{name} is missing")
            continue
        size = p.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{name} has {size} bytes, the manifest says {entry.get('bytes')} (truncated?)")
        elif _sha256(p) != entry.get("sha256"):
            problems.append(f"{name} fails its SHA-256 check (corrupted)")
    return problems


def check(folder: str | Path) -> None:
    """Raise :class:`CheckpointError` naming what is wrong with ``folder`` (nothing when it verifies)."""
    problems = verify(folder)
    if problems:
        raise CheckpointError(f"checkpoint {folder} is not usable: {'; '.join(problems)}. Resume from an earlier "
                              "checkpoint-N (drpost picks the newest complete one when none is named) or delete it")


# ------------------------------------------------------------------------------------ folders
def step_of(path: str | Path) -> int | None:
    m = _CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``run_dir``, oldest (smallest N) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def last_valid_checkpoint(run_dir: str | Path, report=None) -> Path | None:
    """The newest ``checkpoint-N`` of ``run_dir`` whose manifest verifies, or None.

    Every newer folder that fails verification is reported through ``report(message)`` (default: a
    ``UserWarning``), saying what is wrong with it."""
    report = report or (lambda msg: warnings.warn(msg, stacklevel=3))
    for folder in reversed(checkpoints(run_dir)):
        problems = verify(folder)
        if not problems:
            return folder
        report(f"drpost: skipping checkpoint {folder}: {'; '.join(problems)}; trying the previous one")
    return None


def staging_dir(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(STAGING_PREFIX + final.name)


def clear_staging(run_dir: str | Path) -> None:
    """Remove leftovers of interrupted writes and deletions (``.tmp-checkpoint-*``, ``.trash-*``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.is_dir() and (p.name.startswith(STAGING_PREFIX + "checkpoint-") or p.name.startswith(TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def publish(staging: str | Path, final: str | Path) -> Path:
    """Atomically move a complete staging folder to its final name (replacing an older folder of
    the same name, which is first moved aside)."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        aside = final.with_name(TRASH_PREFIX + final.name)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(staging, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(final.parent)
    return final


def rotate(run_dir: str | Path, keep: int | None, protect: str | Path | None = None) -> list[Path]:
    """Delete the oldest ``checkpoint-N`` folders so that at most ``keep`` remain (``protect``, e.g.
    the best model's checkpoint, and the newest are never deleted). A folder is renamed away before
    it is deleted, so an interrupted deletion never leaves a half-deleted ``checkpoint-N``."""
    if not keep or keep <= 0:
        return []
    folders = checkpoints(run_dir)
    protected = {Path(protect).resolve()} if protect else set()
    removable = [p for p in folders[:-1] if p.resolve() not in protected]
    n_remove = max(0, len(folders) - max(keep, len(protected & {p.resolve() for p in folders}) + 1))
    removed = []
    for p in removable[:n_remove]:
        aside = p.with_name(TRASH_PREFIX + p.name)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(p, aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(p)
    return removed
