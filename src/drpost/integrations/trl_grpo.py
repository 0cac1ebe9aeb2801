"""Dr. Post-Training inside TRL's ``GRPOTrainer``.

    from drpost.integrations.trl_grpo import DrPostGRPOConfig, DrPostGRPOTrainer

    args = DrPostGRPOConfig(output_dir="out", feasible_set="filter", frac=1.0, target_source="pool",
                            target_batch=4, refresh_every=1, num_generations=8, max_steps=200)
    trainer = DrPostGRPOTrainer(model="...", reward_funcs=[accuracy], args=args, train_dataset=general,
                                target_dataset=target_prompts, processing_class=tokenizer)
    trainer.train()

Moving a ``GRPOTrainer`` script to drpost is the two class renames plus ``target_dataset=`` (prompt rows
like the training ones, with the columns the reward functions read). Everything but the backward of a
micro-batch is TRL's: the dataloader and its ``RepeatSampler``, generation (``transformers`` or vLLM),
the reward functions (TRL's signature ``fn(prompts, completions, completion_ids, **columns)``),
advantages, the rollout buffer of ``steps_per_generation`` / ``num_iterations``, reference and old
log-probs, logging, checkpoints and accelerate's processes.

What changes (:meth:`DrPostGRPOTrainer.training_step`):

* **The backward.** Each micro-batch of the rollout goes to ``DataRegularizer.backward(rows,
  finalize=<last micro-batch of the optimisation step>)`` with :class:`GRPOTokenLoss`, TRL's
  per-token loss (ratio clipping with ``epsilon``/``epsilon_high``/``delta``, the k3 KL term with
  ``beta``, vLLM's importance-sampling ratio when present) in the form the engine scores. The feasible
  set chooses among the micro-batch's completions and the chosen ones are normalised as TRL normalises
  the ``loss_type`` (METHOD §1.6): ``dapo``/``cispo`` by the completion tokens of the chosen
  completions of the whole step (all ranks), ``grpo``/``sapo`` (sequence means) and ``dr_grpo``
  (sums / ``max_completion_length``) by their number. With a feasible set that keeps everything this
  is TRL's gradient exactly. ``bnpo`` (a token mean per micro-batch, averaged over micro-batches and
  ranks) has no per-completion form and is refused, as are ``luspo``/``vespo`` and the sequence-level
  importance ratio (``importance_sampling_level='sequence'``).
* **The target gradient** (``target_strategy='separate'``) is captured every ``refresh_every``
  optimisation steps, at the step's first micro-batch, from ``target_source='pool'``: ``target_batch``
  prompts of ``target_dataset`` (a seeded choice per step) rolled out ``num_generations`` times each
  through TRL's own ``_generate_and_score_completions`` (the same generation path and reward functions,
  under a forked RNG seeded by (seed, step) so the training rollouts are the ones a stock run draws;
  their statistics are logged as ``drpost/target_reward`` only), or ``'self'``: the rollout being
  trained on (TRL's buffered generation batch). Target loss ``'reward'``: batch z-score of the raw
  rewards times the completion log-prob (METHOD §1.2, fallback r - 0.5 at zero variance); ``'train-loss'``:
  the GRPO objective itself at ratio 1 (TRL's group advantages and KL term). Token mean.
* **IIF** (``iif=True``): when a new rollout is generated, every completion of it is scored once against
  the target gradient (global scope, filter: :func:`drpost.rl.iif.iif_keep`), ``frac`` of the negatively
  scored ones are dropped for every micro-batch and iteration trained on that rollout, and the rest
  trains plainly (normalised over the kept completions). One process only.
* **Empty micro-batches.** One process, with a token normalisation or IIF: a micro-batch without a
  completion token to train on (``mask_truncated_completions`` can empty one; IIF can drop all of its
  completions) is skipped (TRL adds a zero loss for it) and the step is finalised at its last non-empty
  micro-batch (``trainer.skipped_micro_batches`` counts them). A target rollout without any completion
  token is an error.
* **Checks.** Reward functions are wrapped: one that raises, or returns NaN/inf for a completion, stops
  the run with :class:`drpost.rl.rewards.RewardError` naming the function and the row (``None`` stays
  TRL's "not applicable"). Unsupported ``loss_type`` / option combinations, a missing or too small
  target dataset are refused at construction.
* **Logs.** TRL's ``loss`` (the same value per micro-batch), ``kl``, ``entropy``, ``clip_ratio/*`` and
  ``cispo_clip_ratio`` are computed from the engine's forward (in the forward's own precision, where TRL's
  fused LM-head kernel computes in float32); ``drpost/kept`` is the share of completions whose gradient
  was used (mean over layers), ``drpost/target_reward`` the mean reward of the target rollouts.
* **Several processes** (accelerate / torchrun): the model is not wrapped in DDP (drpost reduces the
  chosen gradients itself, one global selection); each rank rolls out its slice of the target prompts
  and the target rows are gathered so every rank captures the whole target batch.
* **Checkpoints**: ``drpost_state.pt`` in each ``checkpoint-N`` (the regularizer's state: the cached
  target gradient and its age, the selection generator); the target prompts and the target RNG are
  functions of (seed, step), so a resumed run equals the uninterrupted one.
"""
from __future__ import annotations

import copy
import os

import torch
from trl import GRPOTrainer

from ..engine import DataRegularizer, NonFiniteError
from ..rl.iif import iif_keep
from ..rl.rewards import checked_reward_function, zscore_rewards
from .trl_grpo_config import (SUPPORTED_LOSS_TYPES, DrPostGRPOConfig, DrPostGRPOOptions, check_grpo_combination,
                              check_target_dataset)
from .trl_grpo_loss import GRPOTokenLoss

__all__ = ["DrPostGRPOConfig", "DrPostGRPOTrainer", "DrPostGRPOOptions", "GRPOTokenLoss", "SUPPORTED_LOSS_TYPES"]

DRPOST_STATE_NAME = "drpost_state.pt"
_NEVER = 10 ** 9


# ---------------------------------------------------------------------------------------------
class DrPostGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose micro-batch backward is ``DataRegularizer.backward`` (module docstring).

    Args (besides GRPOTrainer's own):
        args: a :class:`DrPostGRPOConfig`.
        target_dataset: the target prompts (a list of dicts or a ``datasets.Dataset`` with ``prompt`` and
            the columns the reward functions read), needed for ``target_source='pool'`` with a feasible
            set that selects (or IIF).
    """

    def __init__(self, model, reward_funcs=None, args: DrPostGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *trainer_args, target_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = DrPostGRPOConfig(output_dir=f"{name.rstrip('/').split('/')[-1]}-DrPost-GRPO")
        if not isinstance(args, DrPostGRPOConfig):
            raise TypeError(f"DrPostGRPOTrainer needs DrPostGRPOConfig, got {type(args).__name__}; DrPostGRPOConfig "
                            "accepts every field of GRPOConfig")
        check_grpo_combination(args)
        check_target_dataset(args, target_dataset)
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
                         *trainer_args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("DrPostGRPOTrainer trains on the per-completion GRPO loss only; the MoE router auxiliary "
                             "loss is not a per-completion sum: set router_aux_loss_coef=0.0")
        if args.iif and args.steps_per_generation % args.gradient_accumulation_steps:
            raise ValueError(f"iif=True filters each rollout when it is generated, at the start of an optimisation "
                             f"step: steps_per_generation ({args.steps_per_generation}) must be a multiple of "
                             f"gradient_accumulation_steps ({args.gradient_accumulation_steps})")
        if args.iif and args.world_size > 1:
            raise ValueError("iif=True runs in one process only (the kept completions of a rank would decide how "
                             "many micro-batches it trains, and the ranks must run the same collectives): run it "
                             "without torchrun, or use feasible_set='filter'")
        world = args.world_size
        if args.uses_target and args.target_source == "pool" and (args.target_batch * self.num_generations) % world:
            raise ValueError(f"target_batch x num_generations = {args.target_batch * self.num_generations} target "
                             f"completions do not split evenly over {world} processes: choose target_batch so that "
                             "target_batch * num_generations is a multiple of the number of processes")
        self.target_dataset = target_dataset
        self.reward_funcs = [f if isinstance(f, torch.nn.Module) else checked_reward_function(f, n)
                             for f, n in zip(self.reward_funcs, self.reward_func_names)]
        if world > 1:
            from .hf import DrPostTrainerMixin

            DrPostTrainerMixin._no_ddp_wrapping(self)
        unit = SUPPORTED_LOSS_TYPES[args.loss_type]
        self._unit = unit
        self.drpost_loss = GRPOTokenLoss(args.loss_type, self.epsilon_low, self.epsilon_high, self.beta,
                                         self.temperature, args.delta, args.use_bias_correction_kl,
                                         self.max_completion_length, args.sapo_temperature_pos,
                                         args.sapo_temperature_neg)
        self._engine: DataRegularizer | None = None
        self._scorer: DataRegularizer | None = None
        self._pending_state = None
        self._last_rewards_per_func = None
        self._fresh_rollout = False
        self._first_micro = True
        self._live = None
        self.skipped_micro_batches = 0     # micro-batches without a completion token to train on (one process)

    # ------------------------------------------------------------------ checks
    # ------------------------------------------------------------------ the regularizer(s)
    @property
    def regularizer(self) -> DataRegularizer | None:
        return self._engine

    def _engines(self, model) -> DataRegularizer:
        if self._engine is None:
            a = self.args
            unwrapped = self.accelerator.unwrap_model(model)
            opts = a.engine_options()
            common = dict(target_strategy="separate", refresh_every=_NEVER, loss_fn=self.drpost_loss,
                          pad_token_id=self._tokenizer.pad_token_id)
            if a.iif:
                self._scorer = DataRegularizer(unwrapped, opts, feasible_set="filter", scope="global", **common)
                self._engine = DataRegularizer(unwrapped, opts, feasible_set="standard", frac=1.0, **common)
            else:
                self._engine = DataRegularizer(unwrapped, opts, **common)
            if self._pending_state is not None:
                self._engine.load_state_dict(self._pending_state["regularizer"])
                if self._scorer is not None and self._pending_state.get("scorer") is not None:
                    self._scorer.load_state_dict(self._pending_state["scorer"])
                self._pending_state = None
        return self._engine

    # ------------------------------------------------------------------ rollouts
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = out          # every process's completions (TRL gathers them)
        return out

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            rpf = self._last_rewards_per_func
            rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1).to(torch.float64)
            n = len(inputs)
            local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
            out["drpost_reward"] = rewards[local]
            out["drpost_reward_weight"] = zscore_rewards(rewards.cpu()).to(rewards.device)[local]
            self._fresh_rollout = True
        return out

    def engine_batch(self, inputs: dict, role: str = "general") -> dict:
        """TRL's rollout rows -> an engine batch (see :class:`GRPOTokenLoss`). ``role='target'``: the
        target loss (token mean; 'reward': weights = z-scored rewards, no KL; 'train-loss': ratio 1)."""
        if any(k in inputs for k in ("pixel_values", "image_grid_thw", "num_images")):
            raise ValueError("DrPostGRPOTrainer supports text prompts only (the rollout has images)")
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        labels = torch.cat([torch.full_like(prompt_ids, -100), completion_ids.masked_fill(mask == 0, -100)], 1)
        batch = {"input_ids": input_ids, "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                 "labels": labels}
        n = input_ids.shape[0]
        # tensors with one value per row, so that every chunking of the rows keeps them; '_' keys never reach
        # the model's forward
        batch["_completion_len"] = torch.full((n,), completion_ids.shape[1], dtype=torch.long, device=input_ids.device)
        batch["_per_row"] = torch.full((n,), role == "general" and self._unit == "rows", device=input_ids.device)
        if role == "target":
            if self.args.target_loss == "reward":
                batch["advantages"] = inputs["drpost_reward_weight"]
            else:
                batch["advantages"] = inputs["advantages"]
                if inputs.get("ref_per_token_logps") is not None:
                    batch["ref_logps"] = inputs["ref_per_token_logps"]
            return batch
        batch["advantages"] = inputs["advantages"]
        for src, dst in (("old_per_token_logps", "old_logps"), ("ref_per_token_logps", "ref_logps"),
                         ("importance_sampling_ratio", "is_ratio"), ("drpost_keep", "keep")):
            if inputs.get(src) is not None:
                batch[dst] = inputs[src]
        return batch

    def _target_rollout(self) -> dict:
        """target_batch prompts of the pool (a seeded choice per step), rolled out num_generations times each
        through TRL's own generation and reward path; this process's slice of the rows."""
        a, step = self.args, self.state.global_step
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + 7919 * step + 17)
        picks = torch.randperm(len(self.target_dataset), generator=g)[:a.target_batch].tolist()
        rows = [dict(self.target_dataset[i]) for i in picks for _ in range(self.num_generations)]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per = len(rows) // world
        rows = rows[rank * per:(rank + 1) * per]
        saved_metrics = {k: list(v) for k, v in self._metrics["train"].items()}
        saved_logs = copy.deepcopy(self._logs)
        saved_tokens, fresh = self.state.num_input_tokens_seen, self._fresh_rollout
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(a.seed * 1_000_003 + 104_729 * step + 3)
                out = self._generate_and_score_completions(rows)
        finally:
            self._fresh_rollout = fresh               # a target rollout is no training rollout
            self._metrics["train"].clear()
            self._metrics["train"].update(saved_metrics)
            self._logs = saved_logs
            self.state.num_input_tokens_seen = saved_tokens
        self._target_reward = float(self._last_rewards_per_func.mul(
            self.reward_weights.to(self._last_rewards_per_func.device)).nansum(1).mean())
        return out

    def _gathered(self, inputs: dict) -> dict:
        """Several processes: every rank's target rows, re-padded (prompts left, completions right) and
        concatenated in rank order, so that every rank captures the whole target batch."""
        if self.accelerator.num_processes == 1:
            return inputs
        acc, pad = self.accelerator, self._tokenizer.pad_token_id
        out = {}
        for key, value, first in (("prompt_ids", pad, True), ("prompt_mask", 0, True), ("completion_ids", pad, False),
                                  ("completion_mask", 0, False), ("tool_mask", 1, False),
                                  ("ref_per_token_logps", 0.0, False), ("advantages", None, None),
                                  ("drpost_reward_weight", None, None)):
            t = inputs.get(key)
            if t is None:
                continue
            if t.dim() == 2:
                t = acc.pad_across_processes(t, dim=1, pad_index=value, pad_first=first)
            out[key] = acc.gather(t)
        return out

    def _concat_buffer(self) -> dict:
        """TRL's buffered rollout (all its micro-batch slices) as one dict of rows."""
        parts = self._buffered_inputs
        out = {}
        for k in parts[0]:
            v = parts[0][k]
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                out[k] = torch.cat([p[k] for p in parts])
        return out

    def _refresh_target(self) -> None:
        a = self.args
        engine = self._scorer or self._engine
        source = self._target_rollout() if a.target_source == "pool" else self._concat_buffer()
        target = self.engine_batch(self._gathered(source), "target")
        if not bool((target["labels"] != -100).any()):
            raise ValueError(f"the target rollouts of step {self.state.global_step + 1} have no completion token to form "
                             f"the target gradient from (target_source={a.target_source!r}"
                             + (": every completion was truncated and mask_truncated_completions=True masks them"
                                if self.mask_truncated_completions else "") +
                             "): raise max_completion_length or target_batch, or set mask_truncated_completions=False")
        if a.target_source == "self":
            self._target_reward = float(self._concat_buffer()["drpost_reward"].mean())
        self._capture(engine, target)
        self._metrics["train"]["drpost/target_reward"].append(self._target_reward)

    def _capture(self, engine: DataRegularizer, target: dict) -> None:
        from ..batch import check_batch
        from ..engine.hooks import model_device

        # the target rows are per token (a token mean) and no old log-probs (ratio 1): every supported
        # loss_type's gradient there is -A grad log pi (+ the KL term with 'train-loss')
        with self.compute_loss_context_manager():
            if engine.distributed:
                # the rows are already gathered (with their advantages, which the engine's own gather drops):
                # every rank captures the whole batch, as DataRegularizer.capture_target does after its gather
                engine._passes.capture(check_batch(target, "target", model_device(engine.model)),
                                       self.args.per_device_train_batch_size)
            else:
                engine.capture_target(target, chunk_size=self.args.per_device_train_batch_size)

    def _iif_filter(self) -> None:
        """Score every completion of the new rollout once; mark the kept ones in TRL's buffer."""
        rows = self.engine_batch(self._concat_buffer())
        params = [p for p in self.model.parameters() if p.requires_grad]
        with self.compute_loss_context_manager():
            keep = iif_keep(self._scorer, rows, self.args.per_device_train_batch_size, self.args.frac, params)
        keep = keep.to(rows["input_ids"].device)
        start = 0
        for part in self._buffered_inputs:
            n = part["prompt_ids"].shape[0]
            part["drpost_keep"] = keep[start:start + n]
            start += n
        self._metrics["train"]["drpost/iif_kept"].append(float(keep.double().mean()))

    # ------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        import time

        t0 = time.perf_counter()
        a = self.args
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)          # TRL: generate every steps_per_generation x num_iterations
        engine = self._engines(model)
        ga = self.current_gradient_accumulation_steps
        if self._first_micro:                          # the first micro-batch of an optimisation step
            if a.uses_target and self.state.global_step % a.refresh_every == 0:
                self._refresh_target()
            if a.iif and self._fresh_rollout:
                self._iif_filter()
            self._fresh_rollout = False
            self._micro_index = 0
            self._plan_step(ga)
        j = self._micro_index
        batch = self.engine_batch(inputs)
        loss = torch.zeros((), device=a.device)
        if self._live is None:
            ran, finalize = True, bool(self.accelerator.sync_gradients)
        else:
            ran, finalize = j in self._live, j == max(self._live, default=-1)
        if not ran:
            self.skipped_micro_batches += 1
        if ran:
            record = self.drpost_loss.record = []
            try:
                with self.compute_loss_context_manager():
                    stats = engine.backward(batch, finalize=finalize)
            except NonFiniteError as e:
                raise NonFiniteError(f"training step {self.state.global_step + 1}: {e}") from e
            finally:
                self.drpost_loss.record = None
            loss = self._logged_loss(stats, inputs)
            self._log_step_metrics(record, stats, inputs)
        self._micro_index = j + 1
        self._first_micro = bool(self.accelerator.sync_gradients)
        self._step += 1
        self._current_train_step_time += time.perf_counter() - t0
        if self._step % ga == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return loss.detach().to(device=a.device, dtype=torch.float32)

    def _plan_step(self, ga: int) -> None:
        """One process, with a token normalisation or IIF: the micro-batches of this step that hold a
        completion token to train on (``mask_truncated_completions`` can empty one, IIF can drop all of its
        completions). An empty one is skipped (the engine refuses a batch without a supervised token, TRL
        adds a zero) and the step is finalised at the last non-empty one; a step without any trains
        nothing. The step's micro-batches are TRL's buffered slices (steps_per_generation is a multiple of
        gradient_accumulation_steps in these cases). Several processes: every rank runs every micro-batch
        (the engine counts the tokens over all ranks)."""
        a = self.args
        self._live = None
        if self.accelerator.num_processes > 1 or not (self._unit == "tokens" or a.iif):
            return
        spg = a.steps_per_generation
        slices = [self._buffered_inputs[(self._step + j) % spg] for j in range(ga)]
        self._live = {j for j, part in enumerate(slices) if self._has_completions(part)}

    def _has_completions(self, part) -> bool:
        keep = part.get("drpost_keep")
        if self._unit == "rows":                       # every kept completion counts, even an empty one
            return keep is None or bool(keep.any())
        mask = part["completion_mask"] if "tool_mask" not in part else part["completion_mask"] * part["tool_mask"]
        live = mask.sum(1) > 0
        if keep is not None:
            live = live & keep.to(torch.bool)
        return bool(live.any())

    def _logged_loss(self, stats, inputs) -> torch.Tensor:
        """TRL's returned loss for this micro-batch (the Trainer sums them into the logged ``loss``)."""
        total = stats.general_loss * stats.general_tokens
        ga = self.current_gradient_accumulation_steps
        if self._unit == "tokens":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            normalizer = normalizer * ga / self.args.steps_per_generation
            return total / normalizer.to(total.device)
        return total / (inputs["prompt_ids"].shape[0] * ga)

    def _log_step_metrics(self, record, stats, inputs) -> None:
        """TRL's kl / entropy / clip-ratio metrics from the engine's forward, and drpost's kept share."""
        m = self._metrics["train"]
        if record:
            r = record[-1]
            mask = r["mask"].to(r["coef_1"].dtype)
            acc = self.accelerator

            def global_masked_mean(x):
                totals = acc.reduce(torch.stack([(x * mask).sum(), mask.sum()]).float(), reduction="sum")
                return (totals[0] / totals[1].clamp(min=1.0)).item()

            if r["kl"] is not None:
                m["kl"].append(global_masked_mean(r["kl"]))
            m["entropy"].append(global_masked_mean(r["entropy"]))
            coef, adv = r["coef_1"], r["adv"]
            if self.loss_type in ("grpo", "dr_grpo", "dapo"):
                from trl.trainer.utils import nanmax, nanmin

                low = ((coef < 1 - self.epsilon_low) & (adv < 0)).to(mask.dtype)
                high = ((coef > 1 + self.epsilon_high) & (adv > 0)).to(mask.dtype)
                m["clip_ratio/low_mean"].append(global_masked_mean(low))
                m["clip_ratio/high_mean"].append(global_masked_mean(high))
                m["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
                m["clip_ratio/low_min"].append(nanmin(acc.gather((low * mask).sum(-1) / mask.sum(-1))).item())
                m["clip_ratio/high_max"].append(nanmax(acc.gather((high * mask).sum(-1) / mask.sum(-1))).item())
            elif self.loss_type == "cispo":
                m["cispo_clip_ratio"].append(global_masked_mean(((coef > self.epsilon_high) & (adv > 0)).to(mask.dtype)))
        rows = inputs["prompt_ids"].shape[0] * self.accelerator.num_processes
        if stats.selected:
            kept = sum(float(v) for v in stats.selected.values()) / len(stats.selected) / rows
        elif "drpost_keep" in inputs:
            kept = float(inputs["drpost_keep"].double().mean())
        else:
            kept = 1.0
        m["drpost/kept"].append(kept)

    # ------------------------------------------------------------------ checkpoints
    def drpost_state_dict(self) -> dict:
        if self._engine is None:
            return {"format": 1, "regularizer": (self._pending_state or {}).get("regularizer"),
                    "scorer": (self._pending_state or {}).get("scorer")}
        return {"format": 1, "regularizer": self._engine.state_dict(),
                "scorer": None if self._scorer is None else self._scorer.state_dict()}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self.drpost_state_dict(), os.path.join(folder, DRPOST_STATE_NAME))
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DRPOST_STATE_NAME)
        if not os.path.isfile(path):
            if self.args.uses_target:
                raise ValueError(f"{checkpoint} has no {DRPOST_STATE_NAME} (not written by DrPostGRPOTrainer): the "
                                 "cached target gradient cannot be restored; resume from a DrPostGRPOTrainer checkpoint")
            return
        state = torch.load(path, weights_only=False)
        if self._engine is not None:
            self._engine.load_state_dict(state["regularizer"])
            if self._scorer is not None and state.get("scorer") is not None:
                self._scorer.load_state_dict(state["scorer"])
        else:
            self._pending_state = state

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        self._first_micro = True
        self._fresh_rollout = False
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
