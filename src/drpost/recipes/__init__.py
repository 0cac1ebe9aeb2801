"""Training recipes: one readable function per recipe, sharing :mod:`drpost.recipes.common`.

- :func:`drpost.recipes.sft.run_sft`: supervised fine-tuning with Dr. Post-Training, from a
  :class:`drpost.config.Config` (``drpost train CONFIG``).
- :func:`drpost.recipes.evaluate.evaluate_run`: re-evaluate a trained run (``drpost eval RUN_DIR``).
- :func:`drpost.recipes.spectrum.run_spectrum`: one recipe over feasible sets x fracs x seeds, with a
  results table and plots (``drpost spectrum CONFIG``).
- :func:`drpost.recipes.demo.run_demo`: the demo, one ``run_sft`` per feasible set (``drpost demo``).

The names are imported on first use, so ``import drpost.recipes.demo`` (the command-line parser)
does not load the Hugging Face trainer.
"""

import importlib

__all__ = ["run_sft", "evaluate_run", "run_spectrum", "run_demo"]
_HOME = {"run_sft": "sft", "evaluate_run": "evaluate", "run_spectrum": "spectrum", "run_demo": "demo"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"drpost.recipes.{_HOME[name]}"), name)
    raise AttributeError(f"module 'drpost.recipes' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
