"""GRPO in the RL recipe (``rl.algorithm: grpo``): :func:`run_grpo`, called by :func:`drpost.recipes.rl.run_rl`.

**GRPO** (``rl.algorithm: grpo``, the bbc_category default) trains through
:class:`drpost.integrations.trl_grpo.DrPostGRPOTrainer` (TRL's ``GRPOTrainer`` with drpost's backward).
Its :class:`~drpost.integrations.trl_grpo.DrPostGRPOConfig` (:func:`grpo_config`) comes from the
recipe's sections:

======================================  ===================================================================
recipe                                  DrPostGRPOConfig
======================================  ===================================================================
``rl.group_size``                       ``num_generations``
``rl.prompts_per_step x group_size``    completions per optimisation step (all processes) =
                                        ``per_device_train_batch_size x world x gradient_accumulation_steps``
``rl.micro_batch``                      ``per_device_train_batch_size``: the largest divisor of the
                                        completions per process that is <= rl.micro_batch
                                        (``steps_per_generation`` = ``gradient_accumulation_steps``)
``rl.max_new_tokens``                   ``max_completion_length``
``rl.temperature`` / ``beta``           ``temperature`` (``top_k=0``, ``top_p=1``) / ``beta`` (k3 KL term)
``rl.clip_eps``                         ``epsilon`` (``epsilon_high`` the same)
``rl.epochs``                           ``num_iterations`` (``max_steps`` = train.steps x epochs:
                                        train.steps rollouts; history, eval_every and save_steps
                                        count optimisation steps)
``rl.mini_batches``                     must be 1 (TRL's ``loss_type='dapo'`` needs
                                        steps_per_generation = gradient_accumulation_steps)
``rl.iif / target_loss /                ``iif`` / ``target_loss`` / ``target_source`` / ``target_batch``
target_source / target_batch``          (``target_dataset`` = the task's target pool)
``drpost:`` (engine options)            the same fields (``target_strategy`` always 'separate';
                                        ``refresh_every`` in optimisation steps; with IIF
                                        ``feasible_set`` 'standard' and only ``frac`` used)
``train.lr / weight_decay /             ``learning_rate`` / ``weight_decay`` / ``max_grad_norm`` /
max_grad_norm / lr_scheduler /          ``lr_scheduler_type`` / ``warmup_steps`` (``optim='adamw_torch'``)
warmup_steps``
``train.seed``                          ``seed`` and ``data_seed`` (TRL's prompt order, drpost, the
                                        target rollouts)
``train.bf16`` /                        ``bf16`` / ``activation_checkpointing``
``gradient_checkpointing``
``train.lora_*``                        the recipe's ``prepare_trainable`` (a peft model: TRL's reference
                                        policy is the model with its adapters disabled)
``train.save_steps`` /                  ``save_strategy='steps'`` / ``save_steps`` / ``save_total_limit``
``save_total_limit``                    (``checkpoint-N`` in the run directory, with ``drpost_state.pt``
                                        and drpost's manifest)
======================================  ===================================================================

``loss_type`` is ``'dapo'`` (the token mean over the step, the formula of the hand-written loop),
``scale_rewards='group'``. The prompts are the task's rows as a ``datasets.Dataset`` in TRL's
conversational format (``[system turn with rl.system_prompt unless it is None, user turn]``), so the
chat template renders them as :func:`evaluate_policy` does; the exact-match reward is
:func:`exact_match_reward` (TRL's signature; completions may be message lists). TRL samples the
prompts (its ``RepeatSampler``, seeded) and generates; under ``torchrun`` each rank rolls out its
share of the completions, drpost makes one global selection, and evaluation and writing happen on the
main rank only. ``--resume`` continues from the newest complete ``checkpoint-N`` (TRL restores model,
optimizer, scheduler, RNG and data order; drpost its target gradient) and ends with the parameters of
an uninterrupted run.
"""
from __future__ import annotations

import gc
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from drpost.config import Config, config_to_dict, save_config
from drpost.models import load_model
from drpost.precision import warn_if_slow_bf16
from drpost.rl import tasks as rl_tasks

from .common import (DTYPES, check_run_dir, clear_disk_errors, jsonable, last_checkpoint, make_run_dir,
                     prepare_trainable)
from .rl import evaluate_policy, train_task_reward_model, write_outputs

__all__ = ["run_grpo", "grpo_config", "grpo_layout", "trl_prompt_rows", "trl_reward", "exact_match_reward"]


def _message_text(x) -> str:
    """A TRL prompt or completion (a string or a list of chat messages) as text: the user turns of a
    prompt, the assistant turns of a completion."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        x = [x]
    roles = {m.get("role") for m in x}
    want = "assistant" if "assistant" in roles else "user"
    return "\n".join(str(m.get("content", "")) for m in x if m.get("role") == want)


def trl_reward(fn, name: str):
    """``fn(prompts, completions, **columns)`` on strings (drpost's reward functions and the reward
    model) as a TRL reward function: prompts and completions may be message lists (TRL's
    conversational format); completions are stripped as drpost's rollouts strip them."""
    def reward(prompts, completions, **kw):
        kw.pop("completion_ids", None)
        kw.pop("trainer_state", None)
        kw.pop("log_extra", None)
        kw.pop("log_metric", None)
        return list(fn([_message_text(p) for p in prompts], [_message_text(c).strip() for c in completions], **kw))

    reward.__name__ = name
    return reward


#: the bbc_category reward (exact match of the normalised completion with the section) in TRL's signature
exact_match_reward = trl_reward(rl_tasks.exact_match_reward, "exact_match")


def trl_prompt_rows(rows: list[dict], system_prompt):
    """The task's prompt rows as a ``datasets.Dataset`` in TRL's conversational prompt format: ``prompt`` =
    [system turn (``system_prompt``; none when it is None: the chat template's default), user turn], the
    other columns (``answer``, ``headline``, ``id``) kept for the reward functions."""
    from datasets import Dataset

    if not rows:
        raise ValueError("no prompt rows (an empty task split)")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), str):
            raise ValueError(f"prompt row {i} needs a string 'prompt', got {r.get('prompt')!r:.80}")
        msgs = ([] if system_prompt is None else [{"role": "system", "content": system_prompt}])
        out.append({**r, "prompt": msgs + [{"role": "user", "content": r["prompt"]}]})
    return Dataset.from_list(out)


def grpo_layout(cfg: Config, world: int = 1) -> dict:
    """Completions per optimisation step -> TRL's per-process micro-batch and accumulation steps."""
    rl = cfg.rl
    n = rl.prompts_per_step * rl.group_size
    if rl.mini_batches != 1:
        raise ValueError(f"rl.mini_batches {rl.mini_batches}: GRPO runs on TRL's GRPOTrainer, whose token-mean loss "
                         "(loss_type 'dapo') takes one optimiser step per pass over a rollout: set rl.mini_batches 1 "
                         "(rl.epochs gives several passes)")
    if n % world:
        raise ValueError(f"rl.prompts_per_step x rl.group_size = {n} completions per step do not split evenly over "
                         f"{world} processes: choose them so that their product is a multiple of {world}")
    if world > 1 and rl.iif:
        raise ValueError("rl.iif true runs in one process only (DrPostGRPOTrainer's IIF pre-pass decides per rank "
                         "how many micro-batches it trains): launch without torchrun, or use drpost.feasible_set "
                         "filter")
    uses_target = rl.iif or cfg.drpost.feasible_set != "standard"
    if world > 1 and uses_target and rl.target_source == "pool" and (rl.target_batch * rl.group_size) % world:
        raise ValueError(f"rl.target_batch x rl.group_size = {rl.target_batch * rl.group_size} target completions do "
                         f"not split evenly over {world} processes: choose rl.target_batch so that the product is a "
                         f"multiple of {world}")
    per_rank = n // world
    micro = max(d for d in range(1, min(rl.micro_batch, per_rank) + 1) if per_rank % d == 0)
    return {"completions": n, "per_rank": per_rank, "micro_batch": micro, "grad_accum": per_rank // micro}


def grpo_config(cfg: Config, run_dir, world: int = 1, progress: bool = False):
    """The :class:`~drpost.integrations.trl_grpo.DrPostGRPOConfig` of a recipe (the mapping: module docstring)."""
    from drpost import DrPostOptions
    from drpost.integrations.trl_grpo import DrPostGRPOConfig
    from drpost.training_options import values_of

    rl, t = cfg.rl, cfg.train
    lay = grpo_layout(cfg, world)
    if cfg.drpost.frac == "auto":
        raise ValueError("drpost.frac: auto is not supported by the RL recipe: give frac a number")
    engine = values_of(cfg.drpost, DrPostOptions)
    engine.pop("seed")                           # train.seed seeds drpost too
    engine["target_strategy"] = "separate"
    if rl.iif:
        engine["feasible_set"] = "standard"      # IIF filters each rollout once, with drpost.frac, then trains plainly
    return DrPostGRPOConfig(
        output_dir=str(run_dir), **engine,
        iif=rl.iif, target_loss=rl.target_loss, target_source=rl.target_source, target_batch=rl.target_batch,
        per_device_train_batch_size=lay["micro_batch"], gradient_accumulation_steps=lay["grad_accum"],
        num_generations=rl.group_size, max_completion_length=rl.max_new_tokens, temperature=rl.temperature,
        top_k=0, top_p=1.0, beta=rl.beta, epsilon=rl.clip_eps, epsilon_high=rl.clip_eps, loss_type="dapo", num_iterations=rl.epochs,
        learning_rate=t.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps, optim="adamw_torch",
        max_steps=t.steps * rl.epochs, seed=t.seed, data_seed=t.seed, bf16=t.bf16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": t.checkpoint_reentrant} if t.gradient_checkpointing else None,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None,
        logging_strategy="steps", logging_steps=1, log_completions=False,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit, report_to=[], disable_tqdm=not progress,
        dataloader_num_workers=0, remove_unused_columns=False)


def _trainer_class():
    """DrPostGRPOTrainer whose checkpoints get drpost's manifest (so that ``last_checkpoint`` finds them)."""
    from drpost import checkpoint as ckpt
    from drpost.integrations.trl_grpo import DrPostGRPOTrainer

    class RecipeGRPOTrainer(DrPostGRPOTrainer):
        def _save_checkpoint(self, model, trial):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
                ckpt.write_manifest(folder, step=self.state.global_step)
            self.accelerator.wait_for_everyone()

    return RecipeGRPOTrainer


# TRL log key -> history key (the loop's names)
_HISTORY_KEYS = {"reward": "reward", "reward_std": "reward_std", "drpost/kept": "kept", "kl": "kl",
                 "drpost/target_reward": "target_reward", "frac_reward_zero_std": "zero_std_groups",
                 "completions/mean_length": "completion_tokens", "loss": "loss", "grad_norm": "grad_norm",
                 "learning_rate": "learning_rate", "entropy": "entropy", "drpost/iif_kept": "iif_kept",
                 "step_time": "step_time"}


def _history_rows(log_history: list, seconds: dict) -> list[dict]:
    rows = []
    for h in log_history:
        if "reward" not in h or "loss" not in h:
            continue
        row = {"step": int(h["step"])}
        for src, dst in _HISTORY_KEYS.items():
            if src in h:
                row[dst] = float(h[src])
        row.setdefault("kl", float("nan"))       # beta 0: no reference policy, no KL
        row.setdefault("kept", 1.0)
        for k, v in h.items():
            if k.startswith("rewards/") and k.endswith("/mean"):
                row[f"reward/{k[len('rewards/'):-len('/mean')]}"] = float(v)
        # this process's wall time of the step (generation, update, optimiser; not evaluation or saving);
        # a step of an earlier, resumed process: TRL's step_time
        row["seconds"] = float(seconds.get(row["step"], h.get("step_time", float("nan"))))
        rows.append(row)
    return rows


def run_grpo(cfg: Config, overwrite: bool = False, progress: bool = True, resume: bool = False) -> dict:
    from torch.utils.tensorboard import SummaryWriter
    from transformers import TrainerCallback, set_seed
    from transformers.integrations import TensorBoardCallback

    from drpost.distributed import LaunchRanks

    t_start = time.perf_counter()
    rl, t = cfg.rl, cfg.train
    ranks = LaunchRanks()
    check_run_dir(cfg, resume=resume, overwrite=overwrite)
    ranks.barrier()
    if t.threads:
        torch.set_num_threads(t.threads)
    warn_if_slow_bf16(t.bf16)
    grpo_layout(cfg, ranks.world)                # a bad layout fails before anything is loaded
    set_seed(t.seed)
    task = rl_tasks.build_task(rl.task, n_train=rl.n_train, n_target=rl.n_target, n_test=rl.n_test,
                               n_pairs=rl.n_pairs, prompt_words=rl.prompt_words, balanced=rl.balanced)
    rm_stats = None
    if task.kind == "preference":
        rm, rm_stats = train_task_reward_model(cfg, task, progress and ranks.main)
        reward_funcs, scorer, metric = [trl_reward(rm, "reward_model")], rl_tasks.rouge_l_scorer, "rougeL"
    else:
        reward_funcs, scorer, metric = [exact_match_reward], rl_tasks.exact_match_reward, "accuracy"
    set_seed(t.seed)
    model, tok = load_model(cfg.model.name, num_layers=cfg.model.num_layers, dtype=DTYPES[cfg.model.dtype],
                            attn_implementation=cfg.model.attn_implementation)
    model = prepare_trainable(model, cfg)
    run_dir = cfg.run_dir
    args = grpo_config(cfg, run_dir, ranks.world, progress and ranks.main)
    if ranks.main:
        make_run_dir(cfg, resume, overwrite)
        save_config(cfg, run_dir / "config.yaml")
    ranks.barrier()
    method = "iif" if rl.iif else cfg.drpost.feasible_set
    checkpoint = last_checkpoint(run_dir) if resume else None
    say = print if ranks.main else (lambda *a, **k: None)
    say(f"drpost rl: grpo (TRL GRPOTrainer) on {rl.task} ({task.summary()}), method {method} "
        f"(frac {cfg.drpost.frac}, scope {cfg.drpost.scope}), target {rl.target_source}/{rl.target_loss}, "
        f"{t.steps} steps of {rl.prompts_per_step}x{rl.group_size} completions"
        + (f" on {ranks.world} processes" if ranks.world > 1 else "")
        + (f", resumed from {checkpoint}" if checkpoint else "") + f" -> {run_dir}", flush=True)

    eval_tokens = rl.eval_max_new_tokens or rl.max_new_tokens
    eval_file = run_dir / "eval_log.jsonl"
    writer = SummaryWriter(str(run_dir / "tensorboard")) if ranks.main else None
    evals: list[dict] = []
    if ranks.main and checkpoint is not None and eval_file.is_file():
        done = int(Path(checkpoint).name.split("-")[-1])
        evals = [e for e in map(json.loads, eval_file.read_text().splitlines()) if e["step"] <= done]
    if ranks.main:
        with clear_disk_errors(run_dir):
            eval_file.write_text("".join(json.dumps(jsonable(e)) + "\n" for e in evals))
    last = {}

    def do_eval(policy, step: int) -> None:     # the main rank only (the policy is not wrapped: no collectives)
        res = evaluate_policy(policy, tok, task.test, scorer, eval_tokens, rl.system_prompt, cfg.eval.batch_size)
        evals.append({"step": step, metric: res["score"]})
        writer.add_scalar(f"eval/{metric}", res["score"], step)
        with open(eval_file, "a") as f:
            f.write(json.dumps(jsonable(evals[-1])) + "\n")
        last.update(res, step=step)

    seconds: dict[int, float] = {}

    class Hooks(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, a, state, control, model=None, **kw):
            seconds[state.global_step] = time.perf_counter() - self._t0
            if ranks.main and t.eval_every and state.global_step % t.eval_every == 0 \
                    and state.global_step < state.max_steps:
                do_eval(trainer.model, state.global_step)

    class Board(TensorBoardCallback):            # one event file: the writer stays open for the final evaluation
        def on_train_end(self, a, state, control, **kw):
            if self.tb_writer is not None:
                self.tb_writer.flush()

    callbacks = [Hooks()] + ([Board(tb_writer=writer)] if ranks.main else [])
    ref_patch = _reference_copy(model) if (rl.beta > 0 and t.lora_r == 0) else nullcontext()
    with ref_patch:
        trainer = _trainer_class()(
            model=model, reward_funcs=reward_funcs, args=args, processing_class=tok,
            train_dataset=trl_prompt_rows(task.train, rl.system_prompt),
            target_dataset=trl_prompt_rows(task.target, rl.system_prompt), callbacks=callbacks)
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)     # no log dict printed per step
    try:
        if ranks.main and cfg.eval.at_start and checkpoint is None:
            do_eval(trainer.model, 0)
        with clear_disk_errors(run_dir):
            trainer.train(resume_from_checkpoint=checkpoint)
        final_step = trainer.state.global_step
        if t.save_final:
            with clear_disk_errors(run_dir):
                trainer.save_model(str(run_dir / "final"))   # the main process writes
        if not ranks.main:
            ranks.barrier()
            return {"rank": ranks.rank, "run_dir": str(run_dir)}
        do_eval(trainer.model, final_step)
        final = dict(last)
        if t.save_final:
            tok.save_pretrained(str(run_dir / "final"))
        log_history = list(trainer.state.log_history)
        policy_cfg = args.to_dict()
    finally:
        if trainer.regularizer is not None:
            trainer.regularizer.detach()
        if trainer._scorer is not None:
            trainer._scorer.detach()
        if writer is not None:
            writer.close()
    history = _history_rows(log_history, seconds)

    def mean(key):
        vals = [h[key] for h in history if isinstance(h.get(key), float) and h[key] == h[key]]
        return sum(vals) / len(vals) if vals else None

    lay = grpo_layout(cfg, ranks.world)
    metrics = {
        "run_dir": str(run_dir), "method": method, "algorithm": "grpo", "trainer": "trl", "task": task.summary(),
        "metric": metric, "final": {metric: final["score"], "step": final_step, "n_test": len(task.test)},
        "start": evals[0] if evals and evals[0]["step"] == 0 else None,
        "train_means": {k: mean(k) for k in ("reward", "kl", "kept", "target_reward", "zero_std_groups",
                                             "completion_tokens", "seconds")},
        "history": {"eval": evals, "train": history}, "reward_model": rm_stats,
        "resumed_from": checkpoint, "world_size": ranks.world, "layout": lay,
        "seconds_total": time.perf_counter() - t_start, "config": config_to_dict(cfg),
        "policy_config": {k: v for k, v in policy_cfg.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    with clear_disk_errors(run_dir):
        write_outputs(run_dir, metrics, history, task.test, final)
    ranks.barrier()
    start = metrics["start"][metric] if metrics["start"] else float("nan")
    kept = metrics["train_means"]["kept"]
    print(f"done: {method} {metric} {start:.3f} -> {final['score']:.3f} on {len(task.test)} test prompts, "
          f"mean kept {kept if kept is None else round(kept, 3)}, {metrics['seconds_total']:.0f} s\n"
          f"run directory: {run_dir}", flush=True)
    trainer = model = None
    gc.collect()
    return metrics


class _reference_copy:
    """Full fine-tuning with beta > 0: TRL builds its reference policy from the model's hub id, which
    would load the untruncated checkpoint (model.num_layers); hand it a frozen copy of the initial policy."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        import copy

        import trl.trainer.grpo_trainer as gt

        self._gt, self._saved = gt, gt.create_model_from_path
        initial = copy.deepcopy(self.model)
        gt.create_model_from_path = lambda *a, **k: initial
        return self

    def __exit__(self, *exc):
        self._gt.create_model_from_path = self._saved
        return False
