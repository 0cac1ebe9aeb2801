"""Commit one results folder of a long sweep as its runs finish (so an interrupted sweep, or a fresh
clone, continues from what is on ``main``)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def commit_results(root: Path, path: str, message: str) -> None:
    """Commit ``path`` (only that path) if anything in it changed; retried while git's index is locked
    (several sweeps may finish a run at the same time)."""
    for _ in range(5):
        subprocess.run(["git", "add", path], cwd=root, capture_output=True)
        done = subprocess.run(["git", "commit", "-q", "-m", message, "--", path], cwd=root, capture_output=True,
                              text=True)
        if done.returncode == 0 or "nothing to commit" in done.stdout + done.stderr or "no changes" in done.stdout:
            return
        time.sleep(3)
