"""Training recipes: one readable function per recipe.

- :func:`drpost.recipes.sft.run_sft`: supervised fine-tuning with Dr. Post-Training, from a
  :class:`drpost.config.Config` (``drpost train CONFIG``).
- :func:`drpost.recipes.sft.evaluate_run`: re-evaluate a trained run (``drpost eval RUN_DIR``).
"""

from drpost.recipes.sft import evaluate_run, run_sft

__all__ = ["run_sft", "evaluate_run"]
