"""Crash-safe checkpoints of :class:`drpost.integrations.DrPostTrainer` (a mixin of the Trainer).

``drpost_state.pt`` in every ``checkpoint-N`` folder holds the target sampler's state,
``DataRegularizer.state_dict()`` and, with ``frac='auto'``, the schedule's state; the stock Trainer's files and it are written into a staging folder,
a SHA-256 manifest is written last and the folder is renamed in one atomic step
(:mod:`drpost.checkpoint`). On resume the newest folder whose manifest verifies is taken.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import checkpoint as ckpt

DRPOST_STATE_NAME = "drpost_state.pt"


class CrashSafeCheckpoints:
    """The checkpoint half of DrPostTrainer: needs ``self._reg``, ``self._sampler``, ``self._auto``
    (frac='auto') and ``self._pending_reg_state`` (set by the trainer) besides the Trainer's own attributes."""

    def drpost_state_dict(self) -> dict:
        reg = self._reg
        return {"format": 2,
                "target_sampler": None if self._sampler is None else self._sampler.state_dict(),
                "regularizer": reg.state_dict() if reg is not None else self._pending_reg_state,
                "feasible_set": self.args.feasible_set,
                "auto_frac": None if self._auto is None else self._auto.state_dict()}

    def _save_checkpoint(self, model, trial) -> None:
        """The stock Trainer's checkpoint, written crash-safely (:mod:`drpost.checkpoint`): every file
        (model, optimizer, scheduler, RNG states, trainer state, ``drpost_state.pt``) goes into a
        staging folder, a manifest of checksums is written last, and the folder is renamed to
        ``checkpoint-N`` in one atomic step; older checkpoints are rotated out only afterwards."""
        from transformers.trainer_callback import ExportableState
        from transformers.trainer_utils import SaveStrategy

        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, name)
        stage = str(ckpt.staging_dir(final))
        if self.args.should_save:
            shutil.rmtree(stage, ignore_errors=True)     # leftovers of an interrupted write
            os.makedirs(stage, exist_ok=True)
        self.accelerator.wait_for_everyone()             # no rank writes before the folder is fresh
        os.makedirs(stage, exist_ok=True)
        self.save_model(stage, _internal_call=True)
        if self.args.save_strategy in [SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST] \
                and self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(stage)
            self._save_scaler(stage)
            self._save_rng_state(stage)                  # every rank writes its own RNG file
        if self.args.should_save:
            for cb in [cb for cb in self.callback_handler.callbacks + [self.control]
                       if isinstance(cb, ExportableState)]:
                cb_name, cb_state = cb.__class__.__name__, cb.state()
                if isinstance(self.state.stateful_callbacks[cb_name], list):
                    self.state.stateful_callbacks[cb_name].append(cb_state)
                else:
                    self.state.stateful_callbacks[cb_name] = cb_state
            self.state.save_to_json(os.path.join(stage, TRAINER_STATE_NAME))
            torch.save(self.drpost_state_dict(), os.path.join(stage, DRPOST_STATE_NAME))
        self.accelerator.wait_for_everyone()             # every rank's files are in the staging folder
        if self.args.should_save:
            ckpt.write_manifest(stage, step=self.state.global_step)
            ckpt.publish(stage, final)
            if self.args.push_to_hub:
                self._push_from_checkpoint(final)
            ckpt.rotate(run_dir, self.args.save_total_limit, protect=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_drpost_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, DRPOST_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"{checkpoint} has no {DRPOST_STATE_NAME} (not written by DrPostTrainer?): the target "
                          "sampler and the regularizer's generator start from the seed", stacklevel=3)
            return
        state = torch.load(path, weights_only=True)
        if state.get("target_sampler") is not None and self._sampler is not None:
            self._sampler.load_state_dict(state["target_sampler"])
        self._pending_reg_state = state.get("regularizer")
        if self._auto is not None:
            if state.get("auto_frac") is None:
                raise ValueError(f"{checkpoint} was written by a run without frac='auto': resume it with its own frac")
            self._auto.load_state_dict(state["auto_frac"])

    def _resume_checkpoint(self, checkpoint):
        """``train(resume_from_checkpoint=...)``: the folder to resume from (True: the newest complete one),
        verified, with its drpost state loaded; None for a fresh run."""
        if checkpoint is True:      # the newest checkpoint whose manifest verifies (broken ones are reported)
            found = ckpt.last_valid_checkpoint(self.args.output_dir, report=_report)
            if found is None:
                raise ckpt.CheckpointError(f"resume_from_checkpoint=True but {self.args.output_dir} has no complete "
                                           "checkpoint-N folder to resume from")
            checkpoint = str(found)
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = os.fspath(checkpoint)
            if os.path.isfile(os.path.join(checkpoint, ckpt.MANIFEST_NAME)):
                ckpt.check(checkpoint)
            elif os.path.isdir(checkpoint):
                warnings.warn(f"{checkpoint} has no {ckpt.MANIFEST_NAME} (not written by this drpost version): its "
                              "files cannot be verified", stacklevel=3)
            self._load_drpost_state(checkpoint)
        if self.args.should_save and self.args.save_strategy != "no":
            ckpt.clear_staging(self.args.output_dir)
        return checkpoint


def _report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _checkpoint_step(checkpoint) -> int:
    """The global step a resumed run starts from (0 for a fresh run)."""
    if not isinstance(checkpoint, str):
        return 0
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f).get("global_step", 0))
    return ckpt.step_of(checkpoint) or 0
