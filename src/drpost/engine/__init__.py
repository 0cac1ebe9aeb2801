"""The Dr. Post-Training engine: :class:`DataRegularizer` and its options.

    options.py      DrPostOptions: every knob once (type, default, help, checks, rank fingerprint)
    regularizer.py  the controller: attach/detach, backward, capture_target, state_dict
"""
from .options import NONFINITE, SCORE_NORMS, TARGET_STRATEGIES, DrPostOptions, OptionError
from .regularizer import DataRegularizer, NonFiniteError, StepStats

__all__ = ["DataRegularizer", "DrPostOptions", "OptionError", "NonFiniteError", "StepStats",
           "NONFINITE", "SCORE_NORMS", "TARGET_STRATEGIES"]
