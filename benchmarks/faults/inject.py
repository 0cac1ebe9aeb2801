"""Run the real ``drpost`` command line with one fault armed: the process SIGKILLs itself there.

    python benchmarks/faults/inject.py FAULT -- train configs/tiny_test.yaml [--section.key value ...]

FAULT is ``none`` or ``POINT:N`` (kill on the N-th time the process reaches POINT):

* ``step``          inside an optimisation step: after drpost's backward filled the gradients,
                    before the optimizer step;
* ``eval``          inside an evaluation (the held-out perplexity), half-way through its batches;
* ``save-files``    inside a checkpoint write: model and optimizer files written, RNG and trainer
                    state not yet;
* ``save-manifest`` inside a checkpoint write: every file written, the manifest not yet;
* ``rotate``        inside the deletion of an old checkpoint (moved aside, not yet deleted).

Nothing is simulated: the process is killed with SIGKILL (no cleanup, no ``finally``), exactly as
by the OOM killer or a pre-empted node; only the moment is chosen.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
POINTS = ("step", "eval", "save-files", "save-manifest", "rotate")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    """Patch the place named ``point`` so that its ``n``-th call kills the process."""
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    def wrap(owner, name, before: bool):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if before and hit():
                _die()
            out = original(*args, **kwargs)
            if not before and hit():
                _die()
            return out

        setattr(owner, name, patched)

    if point == "step":
        from drpost.engine import DataRegularizer
        wrap(DataRegularizer, "backward", before=False)
    elif point == "eval":
        import drpost.recipes.sft as sft
        original = sft.perplexity

        def perplexity(model, rows, *args, **kwargs):
            if hit():                  # evaluate half the rows, then die
                original(model, rows[: max(1, len(rows) // 2)], *args, **kwargs)
                _die()
            return original(model, rows, *args, **kwargs)

        sft.perplexity = perplexity
    elif point == "save-files":
        from transformers import Trainer
        wrap(Trainer, "_save_rng_state", before=True)
    elif point == "save-manifest":
        import drpost.checkpoint as ckpt
        wrap(ckpt, "write_manifest", before=True)
    elif point == "rotate":
        import drpost.checkpoint as ckpt
        import shutil
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.startswith(ckpt.TRASH_PREFIX + "checkpoint-") and Path(path).exists() and hit():
                _die()
            return original_rmtree(path, *args, **kwargs)

        ckpt.shutil = type("shutil_with_fault", (), {"rmtree": staticmethod(rmtree)})
    else:
        raise SystemExit(f"unknown fault point {point!r}; choose one of {', '.join(POINTS)}")


def main(argv: list[str]) -> int:
    if "--" not in argv or not argv:
        raise SystemExit(__doc__)
    fault, cli_args = argv[0], argv[argv.index("--") + 1:]
    if fault != "none":
        point, _, n = fault.partition(":")
        arm(point, int(n or 1))
    from drpost.cli import main as drpost_main

    return drpost_main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
