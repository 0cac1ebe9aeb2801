"""Training recipes: one readable function per recipe.

- :func:`drpost.recipes.sft.run_sft`: supervised fine-tuning with Dr. Post-Training, from a
  :class:`drpost.config.Config` (``drpost train CONFIG``).
- :func:`drpost.recipes.sft.evaluate_run`: re-evaluate a trained run (``drpost eval RUN_DIR``).
- :func:`drpost.recipes.spectrum.run_spectrum`: one recipe over feasible sets x fracs x seeds, with a
  results table and plots (``drpost spectrum CONFIG``).
"""

from drpost.recipes.sft import evaluate_run, run_sft
from drpost.recipes.spectrum import run_spectrum

__all__ = ["run_sft", "evaluate_run", "run_spectrum"]
