"""One policy-gradient loop for GRPO (verifiable rewards) and RLOO (learned reward model), with a
drpost feasible set applied to the policy-gradient loss of every micro-batch.

One :meth:`PolicyGradientTrainer.step`, top to bottom:

1. take ``prompts_per_step`` prompts, sample ``group_size`` completions each from the current
   policy (:func:`drpost.rl.rollout.sample`), score them with the reward functions;
2. log-probs of the completions under the rollout policy (``old_logps``) and, when ``beta > 0``,
   under the reference policy (LoRA adapters disabled, or a frozen copy of the initial model);
3. advantages: GRPO = group-normalised rewards, KL as a loss term (k3); RLOO = leave-one-out
   baseline on the KL-shaped reward r - beta * sum_t (log pi_old - log pi_ref), no KL loss term;
4. every ``refresh_every`` steps the *target* gradient is captured (separate strategy): rollouts of
   the current policy on ``target_batch`` prompts of the target pool (or the step's own rollout,
   ``target_source='self'``), with the ``reward`` target loss (batch z-score of the raw rewards
   times the completion log-prob, fallback r - 0.5 at zero variance) or the ``train-loss`` target
   (the training objective itself, at ratio 1);
5. ``epochs`` passes over the rollout in ``mini_batches`` optimiser steps; each mini-batch goes to
   :meth:`DataRegularizer.backward` in micro-batches of ``micro_batch`` rows (``finalize`` on the
   last), so the feasible set selects per micro-batch and the update is the token mean over the
   chosen completions of the whole mini-batch;
6. IIF instead (``iif=True``): the whole rollout is scored once (global, filter) before the update
   epochs, negatively scored completions are dropped, and the rest trains with plain GRPO.

Statistics (reward, accuracy, KL, completion length) are always over the whole rollout, for every
method including IIF (METHOD §9.7); ``kept`` is the share of completions whose gradient was used
(averaged over layers for per-layer feasible sets).

In ``drpost train`` (:mod:`drpost.recipes.rl`) **GRPO runs on TRL's trainer**
(:class:`drpost.integrations.trl_grpo.DrPostGRPOTrainer`, TRL's ``GRPOTrainer`` with drpost's
backward: torchrun, ``--resume``); this loop stays for **RLOO** (leave-one-out baseline, KL-shaped
reward) and as the base of :class:`drpost.rl.ppo.PPOTrainer`, and ``algorithm='grpo'`` still runs here
for code that calls it directly. Its GRPO formulas match TRL's with ``loss_type='dapo'`` (token-mean
over the step), ``scale_rewards=True`` and the k3 KL estimator; TRL's ``selective_log_softmax``
computes the log-probs. One process; no checkpoints.
"""
from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

from drpost.engine import DataRegularizer
from drpost.engine.options import DrPostOptions, OptionError, option
from drpost.training_options import PolicyGradientOptions, check_int

from .iif import iif_keep
from .loss import PolicyLoss, kl_per_token, policy_logps
from .rewards import call_rewards, group_advantages, rloo_advantages, zscore_rewards
from .rollout import Rollout, sample

_NEVER = 10 ** 9


def kept_rows(stats, n: int) -> float:
    """Rows of a micro-batch of ``n`` whose gradient was used (mean over layers; all when nothing selects)."""
    if stats.selected:
        return sum(float(v) for v in stats.selected.values()) / len(stats.selected)
    return float(n)


@dataclass
class PolicyGradientConfig(PolicyGradientOptions, DrPostOptions):
    """Every knob of :class:`PolicyGradientTrainer`: the engine's options (:class:`drpost.DrPostOptions`;
    RL defaults ``feasible_set='filter'``, ``frac=1.0``; ``refresh_every`` is the steps between target
    refreshes, ``target_strategy`` is always 'separate'), the loop's
    (:class:`drpost.training_options.PolicyGradientOptions`) and the optimiser's below. The ``rl:``
    section of a recipe adds the task."""
    feasible_set: str = option("feasible_set", "filter")   # 'standard' = plain GRPO/RLOO
    frac: float = option("frac", 1.0)                      # filter: share of the negatively scored completions dropped
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0       # 0: no clipping
    bf16: bool = False               # bf16 autocast for forward/backward
    generation_batch: int = 32

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every check (the engine's options, the loop's, the optimiser's); run at construction."""
        self.check_options()
        self.check_policy_gradient_options()
        check_int(self, "generation_batch")
        for name, ok, what in (("lr", self.lr > 0, "> 0"), ("max_grad_norm", self.max_grad_norm >= 0, ">= 0")):
            if not ok:
                raise OptionError(name, f"{name} must be {what}, got {getattr(self, name)!r}")
        if self.iif and self.feasible_set not in ("standard", "filter"):
            raise OptionError("feasible_set", "feasible_set must be 'standard' with iif=True (IIF filters the rollout "
                                              f"once, then trains plainly), got {self.feasible_set!r}")

    @property
    def uses_target(self) -> bool:
        return self.iif or self.feasible_set != "standard"


class PolicyGradientTrainer:
    """GRPO/RLOO with a drpost feasible set (or IIF, or plain) on one model.

    Args:
        model: the policy (a causal LM; PEFT LoRA models use the disabled adapter as reference).
        tokenizer: its tokenizer (chat template used for the prompts).
        reward_fns: one reward function or a list (TRL's signature, see :mod:`drpost.rl.rewards`).
        cfg: a :class:`PolicyGradientConfig`.
        train_prompts: prompt rows (dicts with ``prompt`` and extra columns) the policy trains on.
        target_prompts: the target pool (``target_source='pool'`` with a selecting method).
        ref_model: the reference policy (default: adapter disabled for PEFT, else a frozen copy).
        reward_weights: weights of the reward functions (default 1 each).
    """

    def __init__(self, model, tokenizer, reward_fns, cfg: PolicyGradientConfig, train_prompts: list[dict],
                 target_prompts: list[dict] | None = None, ref_model=None, reward_weights=None):
        cfg.check()
        if cfg.algorithm == "ppo" and not getattr(type(self), "is_ppo", False):
            raise ValueError("algorithm='ppo' runs on drpost.rl.ppo.PPOTrainer (with a critic and GAE), not on "
                             "PolicyGradientTrainer (GRPO and RLOO)")
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.reward_fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        if not self.reward_fns:
            raise ValueError("no reward function given")
        self.reward_weights = reward_weights
        if not train_prompts:
            raise ValueError("train_prompts is empty: the policy needs prompts to roll out")
        self.train_prompts = list(train_prompts)
        self.target_prompts = list(target_prompts or [])
        if cfg.uses_target and cfg.target_source == "pool" and len(self.target_prompts) < cfg.target_batch:
            raise ValueError(f"the target pool has {len(self.target_prompts)} prompts, fewer than target_batch="
                             f"{cfg.target_batch}: give more target prompts, lower target_batch, or use "
                             "target_source='self'")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        self.ref_model = ref_model
        if cfg.beta > 0 and ref_model is None and not self._peft:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.loss = PolicyLoss(cfg.clip_eps, cfg.beta if cfg.algorithm == "grpo" else 0.0, cfg.temperature)
        # the loop refreshes the target gradient itself (every cfg.refresh_every steps), so the engine never does
        options = cfg.engine_options()
        common = dict(target_strategy="separate", refresh_every=_NEVER, loss_fn=self.loss, pad_token_id=self.pad_id)
        self.scorer = None
        if cfg.iif:   # whole-rollout scoring (global decision, filter), then plain training
            self.scorer = DataRegularizer(model, options, feasible_set="filter", scope="global", **common)
            self.engine = DataRegularizer(model, options, feasible_set="standard", frac=1.0, **common)
        else:
            self.engine = DataRegularizer(model, options, **common)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._params = params
        self._float = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
        self._rng = random.Random(cfg.seed)
        self._order: list = []
        self.step_count = 0
        self.last_rollout: Rollout | None = None

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=torch.bfloat16)

    def _next_prompts(self) -> list[dict]:
        out = []
        while len(out) < self.cfg.prompts_per_step:
            if not self._order:
                self._order = list(range(len(self.train_prompts)))
                self._rng.shuffle(self._order)
            out.append(self.train_prompts[self._order.pop()])
        return out

    @contextmanager
    def _reference(self):
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.model

    @property
    def _needs_old_logps(self) -> bool:
        """The rollout policy's log-probs are needed when the policy moves before a row is used
        (several epochs or mini-batches) or for RLOO's KL-shaped reward; otherwise ratio = 1 exactly."""
        c = self.cfg
        return c.epochs * c.mini_batches > 1 or (c.algorithm == "rloo" and c.beta > 0)

    def _rollout(self, prompts: list[dict], seed: int, logps: bool = True):
        c = self.cfg
        ad = torch.bfloat16 if c.bf16 else None
        ro = sample(self.model, self.tokenizer, prompts, c.group_size, c.max_new_tokens, c.temperature,
                    c.generation_batch, c.system_prompt, seed=seed, autocast_dtype=ad)
        rewards, parts = call_rewards(self.reward_fns, ro.prompts, ro.completions, self.reward_weights, **ro.columns)
        rows = ro.rows(self.pad_id)
        if logps and self._needs_old_logps:
            rows["old_logps"] = policy_logps(self.model, rows, c.temperature, c.micro_batch, ad)
        if logps and c.beta > 0:
            with self._reference() as ref:
                rows["ref_logps"] = policy_logps(ref, rows, c.temperature, c.micro_batch, ad)
        return ro, rewards, parts, rows

    def _advantages(self, rewards: torch.Tensor, rows: dict) -> torch.Tensor:
        c = self.cfg
        if c.algorithm == "grpo":
            return group_advantages(rewards, c.group_size)
        shaped = rewards
        if c.beta > 0:   # RLOO: KL in the reward (k1 estimate summed over the completion)
            mask = rows["labels"][:, 1:] != -100
            diff = (rows["old_logps"] - rows["ref_logps"])[:, :-1]   # k1 estimate of KL(pi_old || pi_ref)
            shaped = rewards - c.beta * (diff * mask).sum(1).to(torch.float64)
        return rloo_advantages(shaped, c.group_size)

    def _policy_rows(self, rows: dict, adv: torch.Tensor) -> dict:
        out = {k: rows[k] for k in ("input_ids", "attention_mask", "labels", "old_logps") if k in rows}
        out["advantages"] = adv.to(self._float)
        if self.cfg.algorithm == "grpo" and "ref_logps" in rows:
            out["ref_logps"] = rows["ref_logps"]
        return out

    def _target_rows(self, own: tuple) -> tuple[dict, dict]:
        """The target batch (and its statistics) for this refresh."""
        c = self.cfg
        if c.target_source == "self":
            ro, rewards, rows = own
        else:
            prompts = self._rng.sample(self.target_prompts, c.target_batch)
            ro, rewards, _, rows = self._rollout(prompts, seed=c.seed * 1_000_003 + 500_009 + self.step_count,
                                                 logps=c.target_loss == "train-loss")
        if c.target_loss == "reward":
            w = zscore_rewards(rewards)
            target = {k: rows[k] for k in ("input_ids", "attention_mask", "labels")}
            target["advantages"] = w.to(self._float)
        else:
            target = self._policy_rows(rows, self._advantages(rewards, rows))
            target.pop("old_logps", None)   # ratio 1: the objective's gradient at the current policy
        return target, {"target_reward": float(rewards.mean())}

    def _capture(self, engine: DataRegularizer, target: dict) -> None:
        with self._autocast():
            engine.capture_target(target, chunk_size=self.cfg.micro_batch)

    def _iif_keep(self, rows: dict) -> torch.Tensor:
        return iif_keep(self.scorer, rows, self.cfg.micro_batch, self.cfg.frac, self._params, self._autocast)

    def _update(self, rows: dict) -> dict:
        """epochs x mini_batches optimiser steps over ``rows``; returns the kept share and losses."""
        c = self.cfg
        n = rows["input_ids"].shape[0]
        kept, seen, losses, gnorms = 0.0, 0, [], []
        gen = torch.Generator().manual_seed(c.seed * 7919 + self.step_count)
        self.model.train()
        for _ in range(c.epochs):
            order = torch.randperm(n, generator=gen)
            for part in torch.tensor_split(order, min(c.mini_batches, n)):
                if part.numel() == 0:
                    continue
                chunks = torch.split(part, c.micro_batch)
                for j, idx in enumerate(chunks):
                    mb = {k: v[idx] for k, v in rows.items()}
                    with self._autocast():
                        stats = self.engine.backward(mb, finalize=j == len(chunks) - 1)
                    kept += kept_rows(stats, idx.numel())
                    seen += idx.numel()
                    if stats.general_loss is not None:
                        losses.append(float(stats.general_loss))
                if c.max_grad_norm > 0:
                    gnorms.append(float(torch.nn.utils.clip_grad_norm_(self._params, c.max_grad_norm)))
                if any(p.grad is not None for p in self._params):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return {"kept_update": kept / max(seen, 1), "pg_loss": sum(losses) / max(len(losses), 1),
                "grad_norm": sum(gnorms) / len(gnorms) if gnorms else float("nan")}

    # ------------------------------------------------------------------ the step
    def step(self) -> dict:
        c, t0 = self.cfg, time.perf_counter()
        prompts = self._next_prompts()
        ro, rewards, parts, rows = self._rollout(prompts, seed=c.seed * 1_000_003 + self.step_count)
        self.last_rollout = ro
        adv = self._advantages(rewards, rows)
        train = self._policy_rows(rows, adv)
        log = {"step": self.step_count + 1, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
               "completion_tokens": float(ro.completion_lengths().mean()),
               "zero_std_groups": float((rewards.view(-1, c.group_size).std(1) == 0).float().mean())
               if c.group_size > 1 else 0.0}
        log.update({f"reward/{k}": v for k, v in parts.items()})
        if "ref_logps" in rows and "old_logps" in rows:
            mask = (rows["labels"][:, 1:] != -100)
            log["kl"] = float(kl_per_token(rows["old_logps"][:, :-1], rows["ref_logps"][:, :-1], mask))
        if c.uses_target and self.step_count % c.refresh_every == 0:
            target, tstats = self._target_rows((ro, rewards, rows))
            log.update(tstats)
            self._capture(self.scorer or self.engine, target)
        if c.iif:
            keep = self._iif_keep(train)
            self.loss.reset_kl()
            log["kept"] = float(keep.double().mean())
            idx = keep.nonzero().flatten()
            upd = self._update({k: v[idx] for k, v in train.items()}) if idx.numel() else \
                {"kept_update": 0.0, "pg_loss": float("nan"), "grad_norm": float("nan")}
            upd.pop("kept_update")
        else:
            self.loss.reset_kl()
            upd = self._update(train)
            log["kept"] = upd.pop("kept_update")
        if "kl" not in log and "ref_logps" in rows and self.loss.kl_tokens:
            log["kl"] = self.loss.kl     # k3 KL(pi || pi_ref) over the tokens of the update forwards
        log.update(upd)
        log["seconds"] = time.perf_counter() - t0
        self.step_count += 1
        return log

    def close(self) -> None:
        """Remove drpost's hooks from the model."""
        for e in (self.engine, self.scorer):
            if e is not None:
                e.detach()

    def config_dict(self) -> dict:
        return asdict(self.cfg)
