"""Thin glue between drpost's ``DataRegularizer`` and training frameworks.

``drpost.integrations.hf``: ``DrPostArguments`` and ``DrPostTrainer``, a Hugging Face
``transformers.Trainer`` whose backward is the data-regularized one; its target batches
(``target_sampler``) and its crash-safe checkpoints (``checkpoints``) are modules of their own.
"""
from .hf import DrPostArguments, DrPostTrainer, TargetSampler

__all__ = ["DrPostArguments", "DrPostTrainer", "TargetSampler"]
