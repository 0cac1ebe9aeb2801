"""Dr. Post-Training inside the Hugging Face ``Trainer``.

    from drpost.integrations import DrPostArguments, DrPostTrainer

    args = DrPostArguments(output_dir="out", feasible_set="layerwise", frac=0.5, target_batch_size=4,
                           per_device_train_batch_size=16, max_steps=200, logging_steps=10)
    trainer = DrPostTrainer(model=model, args=args, train_dataset=general, target_dataset=target,
                            data_collator=collator)
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

Only ``training_step`` changes: each micro-batch of general data goes through
``DataRegularizer.backward(general, target, finalize=<last micro-batch of the step>)`` instead of
``compute_loss`` + ``accelerator.backward``. Everything after the backward (gradient clipping, the
optimizer, the LR scheduler, logging cadence, evaluation, checkpoints) is the stock Trainer's code,
so ``feasible_set="standard"`` or ``frac=1`` reproduces stock training.

The step lives in :class:`DrPostTrainerMixin`, so that it has one implementation for every Trainer
it runs in: ``DrPostTrainer`` (the plain ``transformers.Trainer``, for tokenised rows with labels)
and :class:`drpost.integrations.DrPostSFTTrainer` (TRL's ``SFTTrainer``: raw datasets in TRL's
formats, chat templates, completion/assistant-only labels, packing and padding-free batches,
``peft_config``; :mod:`drpost.integrations.trl_sft`).

How the pieces map onto the Trainer (transformers 5):

* **Last micro-batch.** ``Trainer._run_epoch`` calls
  ``accelerator.gradient_state._set_sync_gradients(do_sync_step)`` before every ``training_step``,
  where ``do_sync_step`` is exactly the condition under which it clips, steps the optimizer and
  zeroes the gradients after that micro-batch. ``training_step`` therefore passes
  ``finalize=self.accelerator.sync_gradients``.
* **Loss scaling for the logs.** ``get_batch_samples`` (which prefetches the micro-batches of one
  optimisation step) is extended to count the supervised tokens ``labels[:, 1:] != -100`` of the
  whole step; each micro-batch returns ``its loss sum / step tokens``, so the Trainer's ``loss``
  log is the step's token-mean general loss, as with the stock Trainer's ``num_items_in_batch``.
* **Mixed precision.** Accelerate applies autocast by patching the prepared model's ``forward``;
  the regularizer calls that same module, and the whole step runs inside the Trainer's
  ``compute_loss_context_manager()`` as the stock ``compute_loss`` does.
* **Target batches.** ``TargetSampler``: an endless, seeded stream, reshuffled every target
  epoch, drawn once per *optimisation step*: all micro-batches of one accumulated step share the
  same target batch (the target gradient is a property of the step, not of the micro-batch).
* **Checkpoints.** ``drpost_state.pt`` in every ``checkpoint-N`` folder holds the sampler state
  (seed, epoch, position) and ``DataRegularizer.state_dict()`` (the generator of the ``random``
  feasible set, and with the separate strategy the cached target gradient and its age);
  ``train(resume_from_checkpoint=...)`` restores both, so a resumed run is identical to an
  uninterrupted one. Checkpoints are written crash-safely (:mod:`drpost.checkpoint`: a staging
  folder, a SHA-256 manifest written last, an atomic rename, rotation afterwards);
  ``resume_from_checkpoint=True`` takes the newest folder whose manifest verifies and reports the
  broken ones it skips; a named broken folder raises ``CheckpointError``.
* **frac='auto'** (:mod:`drpost.integrations.auto_frac`): ``auto_holdout`` target rows (a seeded
  choice) are held out of the sampler's rows as a validation slice; the candidates ``auto_fracs``
  are played ``auto_every`` steps at a time by successive elimination on the slice's relative loss
  drop, and the regularizer's frac is changed between steps (``DataRegularizer.set_frac``). The
  frac of each step is logged as ``auto_frac`` (mean over the logging interval, with
  ``auto_candidates``, the candidates still alive); ``trainer.auto_frac.summary()`` has the whole
  history. The schedule's state is checkpointed with the rest. One process only.
* **Activation checkpointing.** ``gradient_checkpointing=True`` (``activation_checkpointing``, with
  ``use_reentrant`` True or False in its kwargs) works unchanged: the Trainer enables it on the
  model before the first step and the engine's hooks are idempotent under the recomputation
  (:mod:`drpost.engine.hooks`); selections and gradients are those of the run without it.
* **Skipped steps** (``nonfinite="skip"``): the engine sets every ``.grad`` to None, so torch
  optimizers skip every parameter (no moment update, no weight decay, no step count); the LR
  scheduler still advances, as in the stock Trainer. They are counted in ``skipped_steps``.
* **Logs.** At every logging step the Trainer's log dict gets the running means over the interval
  (over non-skipped steps) of ``general_loss``, ``target_loss``, ``selected_mean/min/max`` (general
  samples chosen per layer in one optimisation step, over layers) and ``selected_tokens`` (their
  supervised tokens, mean over layers), plus ``skipped_steps`` in the interval. They reach every
  ``report_to`` integration (TensorBoard shows them under ``train/``).

Several processes (``torchrun``, one general shard per rank; activation checkpointing works as in
one process; FSDP2: see below):

* **No DDP.** The regularizer reduces the gradients itself (``drpost.distributed``): it gathers the
  scores for one global selection and all-reduces the chosen, token-normalised gradient, so every
  rank writes the same ``.grad``. DDP's reducer would never see the scored layers' gradients
  (drpost writes them after autograd's backward), so the model must not be wrapped: in transformers
  5 the wrapping happens in ``accelerator.prepare(model, optimizer)`` -> ``Accelerator.prepare_model``,
  which DrPostTrainer calls with ``evaluation_mode=True`` (device placement and the mixed-precision
  ``forward`` are still applied; only the DDP wrapper is skipped). FSDP2 (a pre-sharded model, or
  accelerate's FSDP2 plugin) is supported (:mod:`drpost.engine.reduce_fsdp`); FSDP1 and DeepSpeed are refused.
* **Scaling.** Nothing is scaled per rank: each rank accumulates raw token sums of its chosen
  samples, the engine sums them over the ranks and divides by the global chosen-token counts, which
  is the single-process update on the concatenated batch. Gradient clipping and the optimizer then
  run on identical gradients on every rank, so the replicas stay identical.
* **Data.** The general data is sharded by the Trainer's distributed sampler (each rank its own
  rows, the same count everywhere). The ``TargetSampler`` draws the same target indices on every
  rank (same seed); each rank collates its contiguous slice ``[rank*V/R, (rank+1)*V/R)`` (contiguous
  so that the engine's rank-ordered gather rebuilds the target batch in the single-process order)
  and the engine all-gathers the slices, so every rank scores against the whole target batch.
* **Logs.** The Trainer's ``loss`` is the global token-mean general loss (each rank returns its loss
  sum over the global token count times the world size; the Trainer averages over ranks).
  ``selected_mean/min/max`` count the samples chosen over all ranks; ``general_loss``,
  ``target_loss`` and ``selected_tokens`` are the logging rank's (rank 0's) own values.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainingArguments

from .. import checkpoint as ckpt
from ..batch import IGNORE_INDEX
from ..engine import DataRegularizer, NonFiniteError
from ..training_options import DrPostTrainerOptions
from .auto_frac import AutoFrac, holdout_rows
from .checkpoints import DRPOST_STATE_NAME, CrashSafeCheckpoints, _checkpoint_step
from .sharded_checkpoints import ShardedCheckpoints
from .target_sampler import TargetSampler

__all__ = ["DrPostArguments", "DrPostTrainer", "DrPostTrainerMixin", "TargetSampler", "DRPOST_STATE_NAME"]

_TARGET_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass
class DrPostArguments(TrainingArguments, DrPostTrainerOptions):
    """``TrainingArguments`` plus the Dr. Post-Training options: every field of :class:`drpost.DrPostOptions`
    (the same help texts, choices and checks; ``nonfinite`` defaults to 'skip'), ``target_batch_size``,
    the frac='auto' knobs, ``n_target`` and ``selection_log``
    (:class:`drpost.training_options.DrPostTrainerOptions`), so ``HfArgumentParser(DrPostArguments)``
    offers them all as flags. ``seed`` is TrainingArguments' and also seeds the target sampler and drpost
    (the ``random`` feasible set, the sketches)."""

    def __post_init__(self):
        self.check_trainer_options(type(self).__name__)
        TrainingArguments.__post_init__(self)


def rows_shown(indices: list[int], most: int = 10) -> str:
    """``"3, 7, 12 ..."``: the first ``most`` row numbers of an error message."""
    return ", ".join(map(str, indices[:most])) + (" ..." if len(indices) > most else "")


class DrPostTrainerMixin(ShardedCheckpoints, CrashSafeCheckpoints):
    """The Dr. Post-Training step inside a ``transformers.Trainer`` (or a subclass such as TRL's
    ``SFTTrainer``): everything this module's docstring describes. A trainer class puts it first in its
    bases and calls :meth:`_init_drpost` at the end of its ``__init__``; ``_prepare_target`` is the hook
    through which a subclass turns the user's target dataset into tokenised rows."""

    ARGS_CLASS: type = DrPostTrainerOptions

    @classmethod
    def _check_args(cls, args) -> None:
        if not isinstance(args, cls.ARGS_CLASS):
            raise TypeError(f"{cls.__name__} needs {cls.ARGS_CLASS.__name__}, got {type(args).__name__}; "
                            f"{cls.ARGS_CLASS.__name__} accepts every field of {cls.ARGS_CLASS.__mro__[1].__name__}")
        if args.frac_auto and args.world_size > 1:   # every rank sees the same arguments: all refuse
            raise ValueError("frac='auto' runs in one process only: every rank would evaluate the validation slice "
                             "itself and nothing makes the ranks agree on its loss to the last bit, so they could "
                             "choose different fracs; under torchrun give frac a number (e.g. the one a "
                             "single-process frac='auto' run chose: metrics.json auto_frac.chosen)")

    def _init_drpost(self, target_dataset) -> None:
        """After the Trainer's ``__init__``: no DDP wrapper under torchrun, the target rows checked."""
        if self.args.world_size > 1:
            self._no_ddp_wrapping()
        self.target_dataset = self._check_target(self._prepare_target(target_dataset))
        self._reg: DataRegularizer | None = None
        self._reset_run_state()

    def _prepare_target(self, target):
        """The target dataset as tokenised rows (``input_ids``, ``labels``); here: as given."""
        return target

    def _no_ddp_wrapping(self) -> None:
        """Several processes: drpost reduces the gradients itself, so the model must not be wrapped in
        DistributedDataParallel. transformers 5 wraps it inside ``accelerator.prepare`` ->
        ``Accelerator.prepare_model``; call that with ``evaluation_mode=True``, which keeps device
        placement and the autocast ``forward`` and skips only the DDP wrapper."""
        if self.is_deepspeed_enabled:
            raise ValueError(f"{type(self).__name__} does not support DeepSpeed: its engine owns the backward and the "
                             "gradient partitions, which drpost writes itself; use FSDP2 (fsdp='full_shard', "
                             "fsdp_config={'version': 2}) or plain torchrun data parallelism")
        if self.is_fsdp_enabled:
            version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
            if version != 2:
                raise ValueError(f"{type(self).__name__} supports FSDP2 only (fsdp_config version {version} given): FSDP1 "
                                 "flattens the layers' parameters, which drpost scores one by one; set "
                                 "fsdp_config={'version': 2}")
            return   # accelerate applies fully_shard; the engine reduce-scatters the chosen gradients
        if self.args.n_gpu > 1:
            raise NotImplementedError(f"{type(self).__name__} does not support nn.DataParallel (several GPUs in one "
                                      "process): launch one process per GPU with torchrun")
        accelerator = self.accelerator
        prepare_model = accelerator.prepare_model

        def prepare_model_without_ddp(model, device_placement=None, evaluation_mode=False):
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        accelerator.prepare_model = prepare_model_without_ddp

    # ------------------------------------------------------------------ target data
    def _check_target(self, target):
        a = self.args
        if target is None:
            if a.feasible_set == "standard":
                return None
            raise ValueError(f"feasible_set={a.feasible_set!r} needs target examples: pass target_dataset=")
        try:
            n = len(target)
        except TypeError:
            raise TypeError("target_dataset must be a list or a datasets.Dataset of tokenised examples, got "
                            f"{type(target).__name__}") from None
        if n < a.n_target:
            raise ValueError(f"the target dataset has {n} rows but n_target={a.n_target} requires at least "
                             f"{a.n_target}: pass the full target split, or lower n_target")
        if n < a.target_batch_size:
            raise ValueError(f"target_batch_size={a.target_batch_size} is larger than the target dataset ({n} rows)")
        if a.frac_auto and n - a.auto_holdout < a.target_batch_size:
            raise ValueError(f"frac='auto' holds auto_holdout={a.auto_holdout} of the {n} target rows out as its "
                             f"validation slice, which leaves {n - a.auto_holdout} for the target gradient, fewer "
                             f"than target_batch_size={a.target_batch_size}: pass more target rows, or lower "
                             "auto_holdout or target_batch_size")
        empty = []
        for i in range(n):
            row = target[i]
            if not hasattr(row, "keys") or "input_ids" not in row or "labels" not in row:
                keys = sorted(row.keys()) if hasattr(row, "keys") else type(row).__name__
                raise ValueError(f"target example {i} needs 'input_ids' and 'labels' (tokenised, -100 where no "
                                 f"loss); got {keys}")
            labels = torch.as_tensor(row["labels"])
            if labels.dim() != 1 or not bool((labels[1:] != IGNORE_INDEX).any()):
                empty.append(i)
        if empty:
            raise ValueError(f"{len(empty)} target example(s) have no supervised tokens (every label after the "
                             f"first position is -100): rows {rows_shown(empty)}; check the chat template / label "
                             "masking and truncation, or drop those rows")
        return target

    def _target_batch_for_step(self) -> dict | None:
        if self._sampler is None:
            return None
        indices = [self._target_rows[i] for i in self._sampler.next_indices()]   # the same on every rank
        world, rank = self.args.world_size, self.args.process_index
        if world > 1:                              # this rank's contiguous slice; the engine gathers them
            n = len(indices)
            indices = indices[rank * n // world:(rank + 1) * n // world]
            if not indices:
                return None
        return self._target_rows_batch(indices)

    def _target_rows_batch(self, indices) -> dict:
        """Target rows ``indices`` collated by the trainer's collator, on the device."""
        rows = [{k: row[k] for k in _TARGET_KEYS if k in row} for row in (self.target_dataset[i] for i in indices)]
        return self._prepare_inputs(self.data_collator(rows))

    # ------------------------------------------------------------------ the regularizer
    @property
    def regularizer(self) -> DataRegularizer | None:
        return self._reg

    def _regularizer_for(self, model) -> DataRegularizer:
        if self._reg is None:
            a = self.args
            if a.n_gpu > 1:
                raise NotImplementedError(f"{type(self).__name__} does not support nn.DataParallel (several GPUs in one "
                                          "process): launch one process per GPU with torchrun")
            self._reg = DataRegularizer(self.accelerator.unwrap_model(model), a.engine_options(),
                                        pad_token_id=getattr(self.processing_class, "pad_token_id", None))
            if self._pending_reg_state is not None:
                self._reg.load_state_dict(self._pending_reg_state)
                self._pending_reg_state = None
        return self._reg

    def _reset_run_state(self) -> None:
        """A fresh run: new regularizer at the first step, sampler from its seed, empty logs."""
        if self._reg is not None:
            self._reg.detach()
            self._reg = None
        t, a = self.target_dataset, self.args
        # frac='auto': the validation slice is held out of the target rows the sampler draws from
        held = holdout_rows(len(t), a.auto_holdout, a.seed) if a.frac_auto and t is not None else []
        self._target_rows = [] if t is None else sorted(set(range(len(t))) - set(held))
        self._auto = AutoFrac(a.auto_fracs, a.auto_every, a.seed, held) if a.frac_auto and t is not None else None
        self._sampler = None if t is None else TargetSampler(len(self._target_rows), a.target_batch_size, a.seed)
        self._pending_reg_state = None
        self._target_batch = None
        self._auto_step_frac = None
        self._step_tokens = None
        self._micro: list = []
        self._drpost_metrics: dict = {}
        self._skipped_in_interval = 0
        self._selection_micro: list = []

    # ------------------------------------------------------------------ the step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = [(b["labels"][..., 1:] != IGNORE_INDEX).sum() for b in batch_samples
                  if isinstance(b, dict) and isinstance(b.get("labels"), torch.Tensor)]
        self._step_tokens = sum(counts) if counts and len(counts) == len(batch_samples) else None
        if self.args.world_size > 1:
            # the logged loss is the global token mean: every rank needs the tokens of all ranks
            # (each rank calls get_batch_samples once per optimisation step, so this is symmetric)
            local = self._step_tokens if self._step_tokens is not None else torch.tensor(-1)
            total = local.to(device=self.args.device, dtype=torch.float64).reshape(1)
            flags = torch.tensor([float(self._step_tokens is None)], dtype=torch.float64, device=self.args.device)
            both = torch.cat([total, flags])
            torch.distributed.all_reduce(both)
            self._step_tokens = None if float(both[1]) > 0 else both[0]
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        reg = self._regularizer_for(model)
        if self._target_batch is None:                  # first micro-batch of an optimisation step
            if self._auto is not None:
                self._auto_step_frac = self._auto.before_step(self.state.global_step,
                                                              lambda: self._validation_loss(model))
                if reg.frac != self._auto_step_frac:
                    reg.set_frac(self._auto_step_frac)
            self._target_batch = self._target_batch_for_step()
        finalize = bool(self.accelerator.sync_gradients)  # the Trainer steps the optimizer after this one
        try:
            with self.compute_loss_context_manager():
                stats = reg.backward(inputs, self._target_batch, finalize=finalize)
        except NonFiniteError as e:
            raise NonFiniteError(f"training step {self.state.global_step + 1} (global_step "
                                 f"{self.state.global_step}): {e}") from e
        self._record(stats, finalize)
        if self.args.selection_log:
            self._log_selection(reg, stats, finalize)
        if finalize:
            self._target_batch = None
            if self._auto is not None:
                self._auto.after_step(self._auto_step_frac)
                for name, value in (("auto_frac", self._auto_step_frac),
                                    ("auto_candidates", len(self._auto.schedule.alive))):
                    total, n = self._drpost_metrics.get(name, (0.0, 0))
                    self._drpost_metrics[name] = (total + value, n + 1)
        if self._step_tokens is not None:
            loss = stats.general_loss * stats.general_tokens / self._step_tokens.to(stats.general_loss.device)
            if self.args.world_size > 1:
                loss = loss * self.args.world_size  # the Trainer logs the mean over ranks
        else:
            loss = stats.general_loss / self.current_gradient_accumulation_steps
        return loss.detach().to(device=self.args.device, dtype=torch.float32)

    # ------------------------------------------------------------------ frac='auto'
    @property
    def auto_frac(self) -> AutoFrac | None:
        """frac='auto': the schedule's bookkeeping (``.frac``, ``.schedule``, ``.summary()``); else None."""
        return self._auto

    def _validation_loss(self, model) -> float:
        """Token-mean cross-entropy of the validation slice's supervised tokens: eval mode, no grad, the
        training step's autocast (the prepared model inside ``compute_loss_context_manager``)."""
        from ..evaluation.perplexity import perplexity

        held, size = self._auto.holdout, max(1, self.args.per_device_eval_batch_size)
        batches = [self._target_rows_batch(held[j:j + size]) for j in range(0, len(held), size)]
        with self.compute_loss_context_manager():
            return perplexity(model, batches)["loss"]

    # ------------------------------------------------------------------ logs
    def _record(self, stats, finalize: bool) -> None:
        """Keep this micro-batch's device tensors; at the step's end, add the step to the interval."""
        self._micro.append((stats.general_loss, stats.general_tokens, stats.target_loss,
                            dict(stats.selected), dict(stats.selected_tokens)))
        if not finalize:
            return
        micro, self._micro = self._micro, []
        if stats.skipped:
            self._skipped_in_interval += 1
            return
        step = {"general_loss": sum(m[0] * m[1] for m in micro) / sum(m[1] for m in micro)}
        targets = [m[2] for m in micro if m[2] is not None]
        if targets:
            step["target_loss"] = sum(targets) / len(targets)
        layers = list(micro[-1][3])
        if layers:
            counts = torch.stack([sum(m[3][k].float().mean() for m in micro if k in m[3]) for k in layers])
            tokens = torch.stack([sum(m[4][k].float().mean() for m in micro if k in m[4]) for k in layers])
            step.update(selected_mean=counts.mean(), selected_min=counts.min(), selected_max=counts.max(),
                        selected_tokens=tokens.mean())
        for name, value in step.items():
            total, n = self._drpost_metrics.get(name, (0.0, 0))
            self._drpost_metrics[name] = (total + value.detach().float(), n + 1)

    def _log_selection(self, reg, stats, finalize: bool) -> None:
        """Append this micro-batch's selection; at the step's end write the step's line (main process)."""
        masks = {k: m.detach().to("cpu") for k, m in sorted(reg.last_masks.items())}
        self._selection_micro.append(masks)
        if not finalize:
            return
        micro, self._selection_micro = self._selection_micro, []
        if not self.is_world_process_zero():
            return
        digest = hashlib.sha256()
        chosen = []
        for masks in micro:
            for name, m in masks.items():
                digest.update(name.encode())
                digest.update(str(tuple(m.shape)).encode())
                digest.update(m.to(torch.float64).numpy().tobytes())
            chosen.append({k: m.nonzero().flatten().tolist() for k, m in masks.items() if m.dim() == 1})
        line = {"step": self.state.global_step + 1, "skipped": bool(stats.skipped), "digest": digest.hexdigest(),
                "chosen": chosen}
        with open(self.args.selection_log, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()

    def _truncate_selection_log(self, step: int) -> None:
        """Keep the lines of steps <= ``step`` (a resumed run rewrites the later ones); drop a torn last line."""
        path = self.args.selection_log
        if not path or not self.is_world_process_zero():
            return
        kept = []
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        break
                    if entry.get("step", step + 1) > step:
                        break
                    kept.append(json.dumps(entry) + "\n")
        ckpt.atomic_write_bytes(path, "".join(kept).encode())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:      # a training log: add the drpost running means of the interval
            for name, (total, n) in self._drpost_metrics.items():
                logs[name] = float(total) / n
            logs["skipped_steps"] = self._skipped_in_interval
            self._drpost_metrics, self._skipped_in_interval = {}, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ start-up checks
    def _check_ranks_agree(self, checkpoint) -> None:
        """Several processes: refuse to start (the same ValueError on every rank, naming the fields)
        when the ranks were given different data sizes, target rows, drpost options, step budgets or
        checkpoints, before any step runs: with the Trainer's sharding each rank must hold the same
        datasets, and the global selection needs the same options everywhere."""
        from .. import distributed as _dist

        a = self.args

        def fingerprint(data):
            if data is None:
                return None
            n = len(data)
            picks = sorted({0, n // 2, n - 1}) if n else []
            return (n, [[int(v) for v in torch.as_tensor(data[i]["input_ids"]).reshape(-1)[:64].tolist()]
                        for i in picks])

        fields = {
            "len(train_dataset)": len(self.train_dataset) if self.train_dataset is not None else None,
            "target_dataset": _dist.short_digest(fingerprint(self.target_dataset)),
            "drpost options": {**a.fingerprint(), "target_batch_size": a.target_batch_size},
            "max_steps": a.max_steps, "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps,
            "resume checkpoint": os.path.basename(checkpoint) if isinstance(checkpoint, str) else None,
        }
        ctx = _dist.DistContext(None, torch.device(a.device))
        _dist.check_same_config(ctx, fields)

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        self._reset_run_state()
        checkpoint = self._resume_checkpoint(resume_from_checkpoint)
        self._truncate_selection_log(_checkpoint_step(checkpoint))
        if self.args.world_size > 1:
            self._check_ranks_agree(checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)


class DrPostTrainer(DrPostTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose backward is ``DataRegularizer.backward``.

    Args (besides the Trainer's own):
        args: ``DrPostArguments``.
        target_dataset: a list or ``datasets.Dataset`` of tokenised target examples (``input_ids``,
            ``labels`` with -100 for unsupervised positions, optional ``attention_mask``), collated
            with the trainer's ``data_collator``. May be None only for ``feasible_set="standard"``.

    ``trainer.regularizer`` is the ``DataRegularizer`` (created at the first training step on the
    prepared, unwrapped model; ``last_masks``/``last_scores`` describe the last micro-batch). It stays
    attached after ``train()``; ``trainer.regularizer.detach()`` removes its hooks.
    For raw (untokenised) data, chat templates and padding-free batches use
    :class:`drpost.integrations.DrPostSFTTrainer`, the same step on TRL's ``SFTTrainer``.
    """

    ARGS_CLASS = DrPostArguments

    def __init__(self, model=None, args: DrPostArguments | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *trainer_args, target_dataset=None, **kwargs):
        if args is None:
            args = DrPostArguments(output_dir="trainer_output")
        self._check_args(args)
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         *trainer_args, **kwargs)
        self._init_drpost(target_dataset)
