"""Thin glue between drpost's ``DataRegularizer`` and training frameworks.

``drpost.integrations.hf``: ``DrPostArguments`` and ``DrPostTrainer``, a Hugging Face
``transformers.Trainer`` whose backward is the data-regularized one, for tokenised rows; its target
batches (``target_sampler``) and its crash-safe checkpoints (``checkpoints``) are modules of their own.
``drpost.integrations.trl_sft``: ``DrPostSFTConfig`` and ``DrPostSFTTrainer``, the same step on TRL's
``SFTTrainer`` (raw datasets, chat templates, completion/assistant-only loss, padding-free, PEFT).
``drpost.integrations.trl_grpo``: ``DrPostGRPOConfig`` and ``DrPostGRPOTrainer``, drpost's feasible sets
on TRL's ``GRPOTrainer`` loss per micro-batch (TRL's generation, rewards and logging unchanged).
"""
from .hf import DrPostArguments, DrPostTrainer, DrPostTrainerMixin, TargetSampler

_LAZY = {"DrPostSFTConfig": "trl_sft", "DrPostSFTTrainer": "trl_sft",
         "DrPostGRPOConfig": "trl_grpo", "DrPostGRPOTrainer": "trl_grpo"}   # TRL is imported only when used


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["DrPostArguments", "DrPostTrainer", "DrPostTrainerMixin", "TargetSampler", "DrPostSFTConfig",
           "DrPostSFTTrainer", "DrPostGRPOConfig", "DrPostGRPOTrainer"]
