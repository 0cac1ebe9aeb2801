"""drpost: data-regularized LLM post-training (Dr. Post-Training, arXiv 2605.07063).

The general batch builds a feasible set of update directions; the target gradient is projected
onto it. ``DataRegularizer`` attaches to any PyTorch language model and replaces
``loss.backward()``.
"""
from .batch import causal_lm_token_losses
from .engine import DataRegularizer, DrPostOptions, NonFiniteError, OptionError, StepStats
from .feasible import FEASIBLE_SETS, filter_mask, greedy_mask, num_selected, random_mask, topk_mask
from .scoring import BACKENDS

__version__ = "0.1.0"

__all__ = ["DataRegularizer", "DrPostOptions", "OptionError", "StepStats", "NonFiniteError", "FEASIBLE_SETS", "BACKENDS",
           "topk_mask", "filter_mask", "random_mask", "greedy_mask", "num_selected",
           "causal_lm_token_losses"]
