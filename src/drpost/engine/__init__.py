"""The Dr. Post-Training engine: :class:`DataRegularizer` and its options.

    options.py      DrPostOptions: every knob once (type, default, help, checks, rank fingerprint)
    hooks.py        attach(model, sink): the scored groups, forward hooks, the autograd tap
    pipeline.py     the per-layer path: score -> select -> accumulate (the hooks' sink)
    selection.py    the table of feasible sets -> pure policies of drpost.feasible
    passes.py       the forward/backward passes: plain, merged, separate (capture + general)
    reduce.py       LocalReduction | DistributedReduction: targets, choices, finalize
    guards.py       non-finite guards (NonFiniteError)
    state.py        StepStats (per call), StepState (per step), TargetState (per capture)
    regularizer.py  the controller: attach/detach, backward, capture_target, state_dict
"""
from .options import NONFINITE, SCORE_NORMS, TARGET_STRATEGIES, DrPostOptions, OptionError
from .guards import NonFiniteError
from .regularizer import DataRegularizer
from .state import StepStats

__all__ = ["DataRegularizer", "DrPostOptions", "OptionError", "NonFiniteError", "StepStats",
           "NONFINITE", "SCORE_NORMS", "TARGET_STRATEGIES"]
