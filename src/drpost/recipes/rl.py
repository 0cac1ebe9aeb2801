"""Reinforcement learning with Dr. Post-Training, as one readable function: :func:`run_rl`.

    drpost train configs/rlvr_bbc_category.yaml          # GRPO (TRL's GRPOTrainer), exact-match reward
    drpost train configs/rlhf_bbc_headline.yaml          # reward model + RLOO
    drpost train configs/rlvr_bbc_category.yaml --resume # continue a GRPO run from its last checkpoint
    torchrun --nproc-per-node 2 -m drpost.cli train configs/rlvr_bbc_category.yaml   # GRPO on 2 processes

Top to bottom: build the task's splits (:mod:`drpost.rl.tasks`); load the policy (LoRA via peft);
for a preference task, train a reward model on preference pairs first (a second copy of the model
with a scalar head, Bradley-Terry loss) and report its held-out pair accuracy; then train with the
drpost feasible set, IIF (``rl.iif``), or plain (``drpost.feasible_set: standard``), evaluating the
greedy test score every ``train.eval_every`` steps with the task's *independent* scorer (exact
match for bbc_category; ROUGE-L F1 against the real headline for bbc_headline, never the reward model).

**GRPO** (``rl.algorithm: grpo``, the bbc_category default) trains through
:class:`drpost.integrations.trl_grpo.DrPostGRPOTrainer`: :mod:`drpost.recipes.rl_grpo` (the mapping
of the recipe's keys to TRL's config, resume, torchrun).

**RLOO** (``rl.algorithm: rloo``, the bbc_headline default) and **PPO** (``rl.algorithm: ppo``) run on
drpost's own loops, :class:`drpost.rl.PolicyGradientTrainer` and :class:`drpost.rl.ppo.PPOTrainer`
(a critic and GAE): one process, no ``--resume`` (a clear error). TRL 1.16's ``RLOOTrainer`` is not
used: its loss is a sequence-level one with its own KL and normalisation, not the loop's, so the
results would not stay comparable.

Run directory: ``config.yaml``, ``metrics.json`` (final/step-0 test score, per-step history of
reward, KL, kept share, ...), ``train_log.jsonl`` (the per-step rows), ``predictions.json``,
``tensorboard/``, ``final/`` (the LoRA adapter); GRPO adds ``eval_log.jsonl`` (every evaluation, so a
resumed run keeps the earlier ones) and ``checkpoint-N/`` every ``train.save_steps`` steps.
"""
from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch

from drpost.config import Config, config_to_dict, save_config
from drpost.evaluation.generation import generate
from drpost.models import load_model
from drpost.precision import warn_if_slow_bf16
from drpost.rl import PolicyGradientConfig, PolicyGradientTrainer
from drpost.rl import tasks as rl_tasks
from drpost.rl.reward_model import (RewardModelScorer, pair_accuracy, reward_model_from_causal_lm,
                                    train_reward_model)

from .common import (DTYPES, RunDirError, check_run_dir, enable_checkpointing, jsonable, make_run_dir,
                     prepare_trainable, quiet_peft)

__all__ = ["run_rl", "evaluate_policy", "policy_config", "train_task_reward_model", "write_outputs"]


def _algorithm(cfg: Config) -> str:
    return cfg.rl.algorithm or ("grpo" if cfg.rl.task == "bbc_category" else "rloo")


def policy_config(cfg: Config) -> PolicyGradientConfig:
    """The trainer's config: the engine's options from ``drpost:``, the loop's (and PPO's critic / GAE
    knobs) from ``rl:``, the optimiser's and the seed from ``train:``. A :class:`drpost.rl.ppo.PPOConfig`
    when ``rl.algorithm`` is ppo."""
    from drpost import DrPostOptions
    from drpost.rl.ppo import PPOConfig
    from drpost.training_options import PolicyGradientOptions, PPOOptions, values_of

    rl, t = cfg.rl, cfg.train
    values = {
        **values_of(cfg.drpost, DrPostOptions), **values_of(rl, PolicyGradientOptions),
        "algorithm": _algorithm(cfg), "feasible_set": "standard" if rl.iif else cfg.drpost.feasible_set,
        "lr": t.lr, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm, "bf16": t.bf16, "seed": t.seed}
    if values["algorithm"] == "ppo":
        return PPOConfig(**values, **values_of(rl, PPOOptions))
    return PolicyGradientConfig(**values)


def evaluate_policy(model, tokenizer, rows: list[dict], scorer, max_new_tokens: int, system_prompt,
                    batch_size: int = 16) -> dict:
    """Greedy completions of the test prompts scored by ``scorer`` (reward-function signature)."""
    completions = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=False, system_prompt=system_prompt)
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    scores = scorer([r["prompt"] for r in rows], completions, **cols)
    return {"score": sum(scores) / len(scores), "completions": completions, "scores": list(scores)}


def write_outputs(run_dir: Path, metrics: dict, history: list, test: list[dict], final: dict) -> None:
    """A run's ``metrics.json``, ``train_log.jsonl`` (the per-step rows) and ``predictions.json``."""
    (run_dir / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1))
    with open(run_dir / "train_log.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(jsonable(h)) + "\n")
    cols = [k for k in test[0] if k != "prompt"]
    (run_dir / "predictions.json").write_text(json.dumps(
        [{"prompt": r["prompt"], "prediction": c, "score": s, **{k: r[k] for k in cols}}
         for r, c, s in zip(test, final["completions"], final["scores"])], indent=1))


def train_task_reward_model(cfg: Config, task, progress: bool) -> tuple:
    """(scorer, stats) of a preference task's reward model: trained on its pairs (Bradley-Terry), or
    loaded from ``rl.reward_model_path`` when that file exists (and written there after training)."""
    rl = cfg.rl
    lm, tok = load_model(cfg.model.name, num_layers=cfg.model.num_layers, dtype=DTYPES[cfg.model.dtype],
                         attn_implementation=cfg.model.attn_implementation)
    torch.manual_seed(cfg.train.seed + 17)
    with quiet_peft():
        rm = reward_model_from_causal_lm(lm, lora_r=rl.rm_lora_r)
    pairs = task.preference_pairs
    n_hold = max(1, len(pairs) // 5)
    held, train = pairs[:n_hold], pairs[n_hold:]
    cache = Path(rl.reward_model_path).expanduser() if rl.reward_model_path else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu")
        missing = [k for k in saved["state"] if k not in dict(rm.named_parameters())]
        if missing:
            raise ValueError(f"rl.reward_model_path {str(cache)!r} does not match this reward model ({missing[:3]})")
        rm.load_state_dict(saved["state"], strict=False)
        rm.eval()
        for p in rm.parameters():
            p.requires_grad_(False)
        stats = dict(saved["stats"], loaded_from=str(cache))
        print(f"drpost rl: reward model loaded from {cache} (held-out pair accuracy "
              f"{stats['held_out_accuracy']:.3f})", flush=True)
        return RewardModelScorer(rm, tok, system_prompt=rl.system_prompt), stats
    before = pair_accuracy(rm, tok, held, system_prompt=rl.system_prompt)
    t0 = time.perf_counter()
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    res = train_reward_model(rm, tok, train, epochs=rl.rm_epochs, batch_size=rl.rm_batch_size, lr=rl.rm_lr,
                             seed=cfg.train.seed, system_prompt=rl.system_prompt, bf16=cfg.train.bf16,
                             progress=progress)
    after = pair_accuracy(rm, tok, held, system_prompt=rl.system_prompt)
    stats = {"pairs_train": len(train), "pairs_held_out": len(held), "held_out_accuracy_before": before,
             "held_out_accuracy": after, "final_loss": res["final_loss"], "seconds": time.perf_counter() - t0,
             "loss_history": [h["loss"] for h in res["history"]]}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        params = dict(rm.named_parameters())
        torch.save({"state": {n: params[n].detach().clone() for n in trainable}, "stats": stats}, cache)
    print(f"drpost rl: reward model trained on {len(train)} pairs, held-out pair accuracy {before:.3f} -> "
          f"{after:.3f}", flush=True)
    return RewardModelScorer(rm, tok, system_prompt=rl.system_prompt), stats


def run_rl(cfg: Config, overwrite: bool = False, progress: bool = True, resume: bool = False) -> dict:
    """Train and evaluate one RL run; returns the metrics written to ``metrics.json`` (other ranks of a
    torchrun launch: ``{"rank": r, "run_dir": ...}``). ``resume``: continue a GRPO run from the newest
    complete ``checkpoint-N`` of its run directory."""
    algorithm = _algorithm(cfg)
    if algorithm == "grpo":
        from .rl_grpo import run_grpo

        return run_grpo(cfg, overwrite=overwrite, progress=progress, resume=resume)
    if resume:
        raise RunDirError(f"--resume is supported for rl.algorithm grpo only (the TRL-based trainer writes "
                          f"checkpoints); rl.algorithm {algorithm} runs on drpost's own loop, which does not: "
                          "start the run again (--overwrite), or use rl.algorithm grpo")
    return _run_loop(cfg, overwrite=overwrite, progress=progress)


def _run_loop(cfg: Config, overwrite: bool = False, progress: bool = True) -> dict:
    """RLOO / PPO on drpost's own loops (one process)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm
    from transformers import set_seed

    t_start = time.perf_counter()
    rl, t = cfg.rl, cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RunDirError(f"rl.algorithm {_algorithm(cfg)}: the RL recipe runs in one process for RLOO and PPO "
                          "(drpost's own loop: rollouts, reward model and evaluation are not sharded): launch "
                          "`drpost train` without torchrun, or use rl.algorithm grpo (TRL's GRPOTrainer, which "
                          "runs under torchrun)")
    check_run_dir(cfg, resume=False, overwrite=overwrite)
    if t.threads:
        torch.set_num_threads(t.threads)
    warn_if_slow_bf16(t.bf16)
    set_seed(t.seed)
    task = rl_tasks.build_task(rl.task, n_train=rl.n_train, n_target=rl.n_target, n_test=rl.n_test,
                               n_pairs=rl.n_pairs, prompt_words=rl.prompt_words, balanced=rl.balanced)
    rm_stats = None
    if task.kind == "preference":
        reward_fns, rm_stats = train_task_reward_model(cfg, task, progress)
        scorer, metric = rl_tasks.rouge_l_scorer, "rougeL"
    else:
        reward_fns, scorer, metric = [rl_tasks.exact_match_reward], rl_tasks.exact_match_reward, "accuracy"
    set_seed(t.seed)
    model, tok = load_model(cfg.model.name, num_layers=cfg.model.num_layers, dtype=DTYPES[cfg.model.dtype],
                            attn_implementation=cfg.model.attn_implementation)
    model = prepare_trainable(model, cfg)
    enable_checkpointing(model, cfg)
    pg = policy_config(cfg)
    method = "iif" if rl.iif else cfg.drpost.feasible_set
    run_dir = make_run_dir(cfg, False, overwrite)
    save_config(cfg, run_dir / "config.yaml")
    print(f"drpost rl: {pg.algorithm} on {rl.task} ({task.summary()}), method {method} "
          f"(frac {pg.frac}, scope {pg.scope}), target {rl.target_source}/{rl.target_loss}, {t.steps} steps of "
          f"{rl.prompts_per_step}x{rl.group_size} completions -> {run_dir}", flush=True)
    if pg.algorithm == "ppo":
        from drpost.rl.ppo import PPOTrainer

        trainer = PPOTrainer(model, tok, reward_fns, pg, task.train, task.target)
    else:
        trainer = PolicyGradientTrainer(model, tok, reward_fns, pg, task.train, task.target)
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    eval_tokens = rl.eval_max_new_tokens or rl.max_new_tokens
    evals, history = [], []

    def do_eval(step: int) -> dict:
        res = evaluate_policy(trainer.model, tok, task.test, scorer, eval_tokens, rl.system_prompt,
                              cfg.eval.batch_size)
        evals.append({"step": step, metric: res["score"]})
        writer.add_scalar(f"eval/{metric}", res["score"], step)
        return res

    try:
        if cfg.eval.at_start:
            do_eval(0)
        bar = tqdm(range(t.steps), desc=f"rl {method}", disable=not progress)
        for step in bar:
            log = trainer.step()
            history.append(log)
            for k, v in log.items():
                if k != "step" and isinstance(v, float):
                    writer.add_scalar(f"train/{k}", v, log["step"])
            bar.set_postfix(reward=f"{log['reward']:.3f}", kept=f"{log['kept']:.2f}")
            if t.eval_every and log["step"] % t.eval_every == 0 and log["step"] < t.steps:
                do_eval(log["step"])
        final = do_eval(t.steps)
        if t.save_final:
            trainer.model.save_pretrained(str(run_dir / "final"))
            tok.save_pretrained(str(run_dir / "final"))
    finally:
        trainer.close()
        writer.close()

    def mean(key):
        vals = [h[key] for h in history if isinstance(h.get(key), float) and h[key] == h[key]]
        return sum(vals) / len(vals) if vals else None

    metrics = {
        "run_dir": str(run_dir), "method": method, "algorithm": pg.algorithm, "task": task.summary(),
        "metric": metric, "final": {metric: final["score"], "step": t.steps, "n_test": len(task.test)},
        "start": evals[0] if evals and evals[0]["step"] == 0 else None,
        "train_means": {k: mean(k) for k in ("reward", "kl", "kept", "target_reward", "zero_std_groups",
                                             "completion_tokens", "seconds", "value_loss")},
        "history": {"eval": evals, "train": history}, "reward_model": rm_stats,
        "seconds_total": time.perf_counter() - t_start, "config": config_to_dict(cfg),
        "policy_config": trainer.config_dict(),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    write_outputs(run_dir, metrics, history, task.test, final)
    start = metrics["start"][metric] if metrics["start"] else float("nan")
    print(f"done: {method} {metric} {start:.3f} -> {final['score']:.3f} on {len(task.test)} test prompts, "
          f"mean kept {metrics['train_means']['kept']:.3f}, {metrics['seconds_total']:.0f} s\n"
          f"run directory: {run_dir}", flush=True)
    trainer = model = None  # release the policy before returning
    gc.collect()
    return metrics


# ===================================================================================== GRPO on TRL's trainer
