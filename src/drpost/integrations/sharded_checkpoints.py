"""Checkpoints of a model the user sharded with FSDP2 (``fully_shard``) before handing it to
:class:`drpost.integrations.DrPostTrainer` (a mixin of the Trainer).

The stock Trainer knows FSDP only through accelerate's plugin (which applies ``fully_shard`` itself
and, in accelerate 1.x, only on accelerators). Given an already sharded model it would write the
state from rank 0 alone, and gathering a DTensor's full value is a collective, so the save would
hang. Here every rank takes part in gathering the full model and optimizer states
(``torch.distributed.checkpoint.state_dict``, full state dicts offloaded to rank 0's CPU), rank 0
writes them in the stock file layout (``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``),
and on resume every rank reads them and keeps its own shards. Models that are not sharded, or
sharded by accelerate's plugin, take the stock paths.
"""
from __future__ import annotations

import os

import torch


def is_presharded(trainer) -> bool:
    from ..engine.reduce_fsdp import is_dtensor

    return not trainer.is_fsdp_enabled and any(is_dtensor(p) for p in trainer.model.parameters())


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class ShardedCheckpoints:
    """save_model / optimizer and scheduler / resume for a pre-sharded (FSDP2) model."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not is_presharded(self):
            return super().save_model(output_dir, _internal_call)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model, options=_options(cpu_offload=True))   # every rank
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not is_presharded(self):
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        state = get_optimizer_state_dict(self.model, self.optimizer, options=_options(cpu_offload=True))
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not is_presharded(self):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        from transformers.utils import SAFE_WEIGHTS_NAME

        names = (SAFE_WEIGHTS_NAME, "adapter_model.safetensors")     # a full model, or a PEFT adapter
        path = next((os.path.join(resume_from_checkpoint, n) for n in names
                     if os.path.isfile(os.path.join(resume_from_checkpoint, n))), None)
        if path is None:
            raise FileNotFoundError(f"{resume_from_checkpoint} has neither {' nor '.join(names)}: a sharded model "
                                    "resumes from the single-file full state DrPostTrainer writes")
        saved = load_file(path)
        adapter = getattr(self.model, "active_adapter", None)
        state, missing = {}, []
        for name, p in self.model.named_parameters():
            key = name if name in saved else name.replace(f".{adapter}.", ".") if adapter else name
            if key in saved:
                state[name] = saved[key]
            elif p.requires_grad:
                missing.append(name)
        if missing:
            raise ValueError(f"{path} lacks the trainable parameters {missing[:5]}: not a checkpoint of this model")
        set_model_state_dict(self.model, state, options=_options(strict=False))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_presharded(self):
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        opt_path, sched_path = (os.path.join(checkpoint, n) for n in (OPTIMIZER_NAME, SCHEDULER_NAME))
        if not (os.path.isfile(opt_path) and os.path.isfile(sched_path)):
            return
        state = torch.load(opt_path, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=_options())
        self.lr_scheduler.load_state_dict(torch.load(sched_path, weights_only=True))
