"""RLHF with PPO (the algorithm of the paper's RLHF experiment), with a drpost feasible set applied
to the PPO policy loss of every micro-batch, or the IIF baseline.

The installed TRL (1.16) ships no PPO trainer, so this is a small PPO of our own on drpost's RL
pieces (:mod:`~drpost.rl.rollout`, :mod:`~drpost.rl.rewards`, :mod:`~drpost.rl.iif`) and TRL's
``selective_log_softmax``; the formulas are those of standard RLHF PPO (TRL's former
``PPOTrainer``, the reference code's hand-written PPO). One :meth:`PPOTrainer.step`:

1. take ``prompts_per_step`` prompts, sample ``group_size`` completions each (default 1) from the
   current policy, score them with the reward functions (TRL's signature; a learned reward model
   through :class:`drpost.rl.reward_model.RewardModelScorer`);
2. under no gradient: log pi_old of the completion tokens (the rollout policy), log pi_ref (LoRA
   adapters disabled, or a frozen copy of the initial model) when ``beta > 0``, and the critic's
   values V(s_t) at every completion position;
3. per-token rewards  r_t = -beta (log pi_old(y_t) - log pi_ref(y_t))  (the k1 KL estimate), plus the
   reward-model score at the last completion token (:func:`token_rewards`);
4. GAE(gamma, lambda) advantages and returns = advantages + values (:func:`gae`); advantages
   whitened over all completion tokens of the rollout (:func:`whiten`, ``whiten_advantages``);
5. every ``refresh_every`` steps the *target* gradient is captured (separate strategy) from rollouts
   of the current policy on ``target_batch`` target prompts (or the step's own rollout,
   ``target_source='self'``) with the ``reward`` target loss (batch z-score of the scores times the
   completion log-prob) or the ``train-loss`` target (the PPO policy objective at ratio 1 with the
   target rollout's whitened GAE advantages; the reference code's ``token-pg`` is the same gradient
   here, because the critic is separate and the clip is inactive at ratio 1);
6. ``epochs`` passes over the rollout in ``mini_batches`` optimiser steps. Each mini-batch:
   the policy loss (the clipped surrogate, :class:`PPOPolicyLoss`) goes to
   :meth:`drpost.DataRegularizer.backward` in micro-batches of ``micro_batch`` rows (``finalize`` on
   the last), so the feasible set selects per micro-batch and the policy update is the token mean
   over the chosen completions of the whole mini-batch; the clipped value loss of the same rows
   trains the critic with a plain backward (token mean over all rows of the mini-batch);
7. IIF instead (``iif=True``): the whole rollout is scored once (global scope, filter) against the
   target gradient before the update epochs, the negatively scored completions (``frac`` of them)
   are dropped, and plain PPO (policy and critic) runs on the rest.

**The critic** is a separate small model (:class:`ValueModel`: a decoder stack with a scalar head
read at every position), by default a copy of the policy's own decoder
(:func:`value_model_from_causal_lm`). The reference code puts a value head on the policy's last
hidden state and adds 0.1 x value loss to the loss its hooks see, so its per-sample gradients mix
the policy and the value regression. Here the value loss is deliberately *not* data-regularized:
the feasible set decides which completions' policy gradient the update follows towards the target;
the critic is only the baseline of the advantage estimate, its parameters are disjoint from the
policy's, and training it on every completion changes neither the scores nor the chosen policy
update (dropping completions from the critic would only make the baseline worse). With
``feasible_set='standard'`` the step equals a hand-written PPO with plain autograd (tests/test_ppo.py).

Statistics (score, KL, completion length, values) are over the whole rollout for every method,
IIF included (METHOD §9.7); ``kept`` is the share of completions whose policy gradient was used.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from drpost.engine import DataRegularizer
from drpost.engine.options import OptionError, help_meta
from drpost.training_options import PPOOptions, policy_gradient_option

from .grpo import _NEVER, PolicyGradientConfig, PolicyGradientTrainer, kept_rows
from .loss import policy_logps, shifted_labels, token_logps
from .reward_model import scalar_head
from .rewards import call_rewards, zscore_rewards
from .rollout import sample

POLICY_KEYS = ("input_ids", "attention_mask", "labels", "old_logps", "advantages")


# ---------------------------------------------------------------------------------------------- PPO math
def completion_mask(rows: dict) -> torch.Tensor:
    """[N, L] True at the positions whose logits predict a completion token (aligned with log-probs)."""
    return shifted_labels(rows) != -100


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, old_logps: torch.Tensor | None = None,
                  ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """Per-token rewards [N, L] (float64): -beta * (log pi_old - log pi_ref) at every completion
    position (k1 KL estimate, none when ``beta == 0``) plus the sequence score at the last one."""
    mask = mask.bool()
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must have shape [{mask.shape[0]}], got {tuple(scores.shape)}")
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError(f"row {int((counts == 0).nonzero()[0])} has no completion token: every PPO row needs one")
    r = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    if beta > 0:
        if old_logps is None or ref_logps is None:
            raise ValueError("beta > 0 needs old_logps and ref_logps for the KL reward")
        r = torch.where(mask, -beta * (old_logps.double() - ref_logps.double()), r)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(1).values
    r[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(r.device, torch.float64)
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the completion positions of each row (float64):

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lambda A_{t+1},

    where t+1 is the row's next completion position (V = 0 and A = 0 after its last one: the
    episode ends with the completion). Returns (advantages, returns = advantages + values), both 0
    outside the mask."""
    mask = mask.bool()
    r, v = rewards.to(torch.float64), values.to(torch.float64)
    n, length = r.shape
    adv = torch.zeros_like(r)
    running = torch.zeros(n, dtype=torch.float64, device=r.device)
    next_value = torch.zeros(n, dtype=torch.float64, device=r.device)
    for t in range(length - 1, -1, -1):
        m = mask[:, t]
        current = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * running
        adv[:, t] = torch.where(m, current, torch.zeros_like(current))
        running = torch.where(m, current, running)
        next_value = torch.where(m, v[:, t], next_value)
    returns = torch.where(mask, adv + v, torch.zeros_like(adv))
    return adv, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance, as TRL's former
    ``masked_whiten``; the mean is not added back); 0 outside the mask. With one masked entry
    (no variance) the result is x - mean = 0."""
    mask = mask.bool()
    n = int(mask.sum())
    if n == 0:
        raise ValueError("whiten: no masked entry")
    x = x.to(torch.float64)
    mean = x[mask].mean()
    centred = x - mean
    if n > 1:
        var = (centred[mask] ** 2).sum() / (n - 1)
        centred = centred * torch.rsqrt(var + eps)
    return torch.where(mask, centred, torch.zeros_like(centred))


def value_loss_sum(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> torch.Tensor:
    """Sum over the masked tokens of the clipped value loss  max((V - R)^2, (V_clip - R)^2),
    V_clip = V_old + clamp(V - V_old, -clip, clip) (multiply by 0.5 / tokens for the token mean)."""
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    old, ret = old_values.to(values.dtype), returns.to(values.dtype)
    clipped = old + torch.clamp(values - old, -clip, clip)
    loss = torch.maximum((values - ret) ** 2, (clipped - ret) ** 2)
    return torch.where(mask.bool(), loss, torch.zeros_like(loss)).sum()


class PPOPolicyLoss:
    """``loss_fn(logits, batch) -> (per-token losses [N, L], completion mask [N, L])`` for the engine:

        l_{i,t} = -min(rho A_{i,t}, clip(rho, 1 - eps, 1 + eps) A_{i,t}),  rho = exp(log pi - log pi_old),

    with per-token ``advantages`` [N, L] (aligned with the shifted labels, like ``old_logps``) or one
    value per row [N] (broadcast over its tokens: the ``reward`` target loss). Without ``old_logps``
    the ratio is 1 (the gradient is -A grad log pi). No KL term: in PPO the KL is in the reward."""

    def __init__(self, clip_eps: float = 0.2, temperature: float = 1.0):
        if not 0 < clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.clip_eps, self.temperature = float(clip_eps), float(temperature)
        self.reset()

    def reset(self) -> None:
        self.clipped_tokens, self.tokens = 0.0, 0.0   # share of clipped ratios since reset() (monitoring)

    @property
    def clip_frac(self) -> float:
        return self.clipped_tokens / self.tokens if self.tokens else float("nan")

    def __call__(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "advantages" not in batch:
            raise ValueError("a PPO batch needs 'advantages' ([N, L] per token, or [N] per completion)")
        logps, mask = token_logps(logits, batch, self.temperature)
        adv = batch["advantages"].to(logps.dtype)
        if adv.dim() == 1 and adv.shape[0] == logps.shape[0]:
            adv = adv.view(-1, 1)
        elif adv.shape != logps.shape:
            raise ValueError(f"advantages must have shape {tuple(logps.shape)} (per token) or "
                             f"[{logps.shape[0]}] (per completion), got {tuple(adv.shape)}")
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.to(logps.dtype)
        ratio = torch.exp(logps - old)
        clipped = torch.clamp(ratio, 1.0 - self.clip_eps, 1.0 + self.clip_eps)
        loss = -torch.minimum(ratio * adv, clipped * adv)
        with torch.no_grad():
            self.clipped_tokens += float(((ratio - clipped).abs() > 0).logical_and(mask).sum())
            self.tokens += float(mask.sum())
        return torch.where(mask, loss, torch.zeros_like(loss)), mask


# ---------------------------------------------------------------------------------------------- the critic
class ValueModel(nn.Module):
    """The critic: a decoder stack (``backbone(input_ids=, attention_mask=).last_hidden_state``) and a
    linear scalar head read at every position; ``forward`` returns values [N, L] (float32 or wider)."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = scalar_head(backbone, hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        v = self.head(h).squeeze(-1)
        return v.to(torch.promote_types(v.dtype, torch.float32))


def value_model_from_causal_lm(lm: nn.Module) -> ValueModel:
    """A critic initialised from a *copy* of ``lm``'s decoder (``lm`` itself is untouched). A PEFT
    policy's copy keeps its LoRA adapters as the critic's only trainable decoder weights."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    backbone = getattr(base, "model", None)
    if backbone is None or not hasattr(base, "config"):
        raise ValueError("value_model_from_causal_lm needs a Hugging Face causal LM with a .model decoder; "
                         "pass value_model= (a module returning values [N, L]) for other policies")
    vm = ValueModel(copy.deepcopy(backbone), base.config.hidden_size)
    vm.head.to(next(backbone.parameters()).device)
    return vm


# ---------------------------------------------------------------------------------------------- config
@dataclass
class PPOConfig(PPOOptions, PolicyGradientConfig):
    """Every knob of :class:`PPOTrainer`: :class:`drpost.rl.PolicyGradientConfig`'s (the engine's
    options, RL defaults ``feasible_set='filter'``, ``frac=1.0``; the loop's; the policy optimiser's)
    with PPO's defaults (one completion per prompt, 4 epochs, KL in the reward) and the critic's
    (:class:`drpost.training_options.PPOOptions`). ``algorithm`` is always 'ppo'."""
    algorithm: str = field(default="ppo", metadata=help_meta("Always 'ppo' for this trainer."))
    group_size: int = policy_gradient_option("group_size", 1)
    epochs: int = policy_gradient_option("epochs", 4)
    beta: float = field(default=0.05, metadata=help_meta(
        "KL coefficient: per-token reward -beta * (log pi_old - log pi_ref) (k1 estimate); 0: no reference."))

    def check(self) -> None:
        if self.algorithm != "ppo":
            raise OptionError("algorithm", f"PPOConfig.algorithm must be 'ppo', got {self.algorithm!r}; "
                                           "GRPO and RLOO run on drpost.rl.PolicyGradientTrainer")
        super().check()
        self.check_ppo_options()


# ---------------------------------------------------------------------------------------------- trainer
class PPOTrainer(PolicyGradientTrainer):
    """PPO with a drpost feasible set on the policy loss (or IIF, or plain) and a separate critic.

    Args:
        model: the policy (a causal LM; PEFT LoRA models use the disabled adapter as reference).
        tokenizer: its tokenizer (chat template used for the prompts).
        reward_fns: one reward function or a list (TRL's signature, see :mod:`drpost.rl.rewards`); a
            learned reward model through :class:`drpost.rl.reward_model.RewardModelScorer`.
        cfg: a :class:`PPOConfig`.
        train_prompts: prompt rows (dicts with ``prompt`` and extra columns) the policy trains on.
        target_prompts: the target pool (``target_source='pool'`` with a selecting method or IIF).
        ref_model: the reference policy (default: adapter disabled for PEFT, else a frozen copy).
        value_model: the critic, ``value_model(input_ids=, attention_mask=) -> values [N, L]``
            (default: :func:`value_model_from_causal_lm` of the policy).
        reward_weights: weights of the reward functions (default 1 each).

    The checks, reference policy, prompt order, target capture and IIF scoring are
    :class:`~drpost.rl.grpo.PolicyGradientTrainer`'s; the rollout rows live on the policy's device;
    the advantages, the losses and the update are PPO's.
    """
    is_ppo = True

    def __init__(self, model, tokenizer, reward_fns, cfg: PPOConfig, train_prompts: list[dict],
                 target_prompts: list[dict] | None = None, ref_model=None, value_model=None, reward_weights=None):
        if not isinstance(cfg, PPOConfig):
            raise TypeError(f"cfg must be a drpost.rl.ppo.PPOConfig, got {type(cfg).__name__}")
        for i, row in enumerate(train_prompts or []):
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(f"train prompt {i} must be a dict with a 'prompt' key, got {row!r:.80}")
            if not row["prompt"]:
                raise ValueError(f"train prompt {i} is empty: every prompt needs text (or messages) to roll out")
        self.value_model = value_model if value_model is not None else value_model_from_causal_lm(model)
        if not isinstance(self.value_model, nn.Module):
            raise TypeError(f"value_model must be a torch.nn.Module, got {type(self.value_model).__name__}")
        self._value_params = [p for p in self.value_model.parameters() if p.requires_grad]
        if not self._value_params:
            raise ValueError("the value model has no trainable parameter")
        if {id(p) for p in self.value_model.parameters()} & {id(p) for p in model.parameters()}:
            raise ValueError("the value model shares parameters with the policy: drpost's feasible set applies to "
                             "the policy loss only, so the critic must be a separate module (the default, "
                             "value_model_from_causal_lm(policy), copies the policy's decoder)")
        super().__init__(model, tokenizer, reward_fns, cfg, train_prompts, target_prompts, ref_model, reward_weights)
        # the policy loss (replaces PolicyGradientTrainer's GRPO loss in the engines)
        self.loss = PPOPolicyLoss(cfg.clip_eps, cfg.temperature)
        options = cfg.engine_options()
        common = dict(target_strategy="separate", refresh_every=_NEVER, loss_fn=self.loss, pad_token_id=self.pad_id)
        for e in (self.engine, self.scorer):
            if e is not None:
                e.detach()
        self.scorer = None
        if cfg.iif:
            self.scorer = DataRegularizer(model, options, feasible_set="filter", scope="global", **common)
            self.engine = DataRegularizer(model, options, feasible_set="standard", frac=1.0, **common)
        else:
            self.engine = DataRegularizer(model, options, **common)
        self.value_optimizer = torch.optim.AdamW(self._value_params, lr=cfg.value_lr, weight_decay=cfg.weight_decay)

    # ------------------------------------------------------------------ pieces
    def _rollout(self, prompts: list[dict], seed: int, logps: bool = True):
        """Sample, score, build the rows on the policy's device; with ``logps`` add log pi_old and
        (``beta > 0``) log pi_ref of the completion tokens."""
        c = self.cfg
        ad = torch.bfloat16 if c.bf16 else None
        ro = sample(self.model, self.tokenizer, prompts, c.group_size, c.max_new_tokens, c.temperature,
                    c.generation_batch, c.system_prompt, seed=seed, autocast_dtype=ad)
        scores, parts = call_rewards(self.reward_fns, ro.prompts, ro.completions, self.reward_weights, **ro.columns)
        device = next(self.model.parameters()).device
        rows = {k: v.to(device) for k, v in ro.rows(self.pad_id).items()}
        if logps:
            rows["old_logps"] = policy_logps(self.model, rows, c.temperature, c.micro_batch, ad)
            if c.beta > 0:
                with self._reference() as ref:
                    rows["ref_logps"] = policy_logps(ref, rows, c.temperature, c.micro_batch, ad)
        return ro, scores, parts, rows

    @torch.no_grad()
    def _values(self, rows: dict) -> torch.Tensor:
        out = []
        self.value_model.eval()
        for s in range(0, rows["input_ids"].shape[0], self.cfg.micro_batch):
            with self._autocast():
                v = self.value_model(input_ids=rows["input_ids"][s:s + self.cfg.micro_batch],
                                     attention_mask=rows["attention_mask"][s:s + self.cfg.micro_batch])
            out.append(v.to(torch.float64))
        values = torch.cat(out)
        if values.shape != rows["input_ids"].shape:
            raise ValueError(f"the value model returned values of shape {tuple(values.shape)}; expected one per "
                             f"position, {tuple(rows['input_ids'].shape)}")
        mask = completion_mask(rows)
        if not bool(torch.isfinite(values[mask]).all()):
            raise FloatingPointError("the value model returned non-finite values on the completion tokens; "
                                     "lower value_lr or check the critic")
        return torch.where(mask, values, torch.zeros_like(values))

    def _ppo_rollout(self, prompts: list[dict], seed: int, full: bool = True):
        """The rollout, its scores and its rows; ``full`` adds log pi_old, log pi_ref, values, per-token
        rewards, GAE advantages (whitened) and returns."""
        c = self.cfg
        ro, scores, parts, rows = self._rollout(prompts, seed=seed, logps=full)
        if full:
            mask = completion_mask(rows)
            rows["values"] = self._values(rows)
            rows["rewards"] = token_rewards(scores, mask, rows.get("old_logps"), rows.get("ref_logps"), c.beta)
            adv, rows["returns"] = gae(rows["rewards"], rows["values"], mask, c.gamma, c.lam)
            rows["advantages"] = (whiten(adv, mask) if c.whiten_advantages else adv).to(self._float)
        return ro, scores, parts, rows

    def _target_rows(self, own: tuple) -> tuple[dict, dict]:
        c = self.cfg
        if c.target_source == "self":
            ro, scores, rows = own
        else:
            prompts = self._rng.sample(self.target_prompts, c.target_batch)
            ro, scores, _, rows = self._ppo_rollout(prompts, seed=c.seed * 1_000_003 + 500_009 + self.step_count,
                                                    full=c.target_loss == "train-loss")
        target = {k: rows[k] for k in ("input_ids", "attention_mask", "labels")}
        if c.target_loss == "reward":
            target["advantages"] = zscore_rewards(scores).to(target["input_ids"].device, self._float)
        else:   # the PPO policy objective at ratio 1 (no old_logps): -sum_t A_t grad log pi
            target["advantages"] = rows["advantages"]
        return target, {"target_reward": float(scores.mean())}

    def _update(self, rows: dict) -> dict:
        """epochs x mini_batches optimiser steps of policy and critic over ``rows``. Logged
        ``value_loss``: 0.5 x the token mean of the clipped value loss over a mini-batch (before
        ``vf_coef``), averaged over the mini-batches (``_first``/``_last``: the first and last ones)."""
        c = self.cfg
        n = rows["input_ids"].shape[0]
        kept, seen, pg, vl, gnorms, vnorms = 0.0, 0, [], [], [], []
        gen = torch.Generator().manual_seed(c.seed * 7919 + self.step_count)
        mask_all = completion_mask(rows)
        self.model.train()
        self.value_model.train()
        for _ in range(c.epochs):
            order = torch.randperm(n, generator=gen)
            for part in torch.tensor_split(order, min(c.mini_batches, n)):
                if part.numel() == 0:
                    continue
                tokens = int(mask_all[part].sum())
                chunks = torch.split(part, c.micro_batch)
                v_sum = 0.0
                for j, idx in enumerate(chunks):
                    mb = {k: rows[k][idx] for k in POLICY_KEYS}
                    with self._autocast():
                        stats = self.engine.backward(mb, finalize=j == len(chunks) - 1)
                    kept += kept_rows(stats, idx.numel())
                    seen += idx.numel()
                    if stats.general_loss is not None:
                        pg.append(float(stats.general_loss))
                    # the critic: plain backward, every row of the mini-batch (not data-regularized)
                    with self._autocast():
                        values = self.value_model(input_ids=rows["input_ids"][idx],
                                                  attention_mask=rows["attention_mask"][idx])
                    loss = value_loss_sum(values, rows["values"][idx], rows["returns"][idx], mask_all[idx],
                                          c.cliprange_value) * (0.5 / tokens)
                    (c.vf_coef * loss).backward()
                    v_sum += float(loss.detach())
                vl.append(v_sum)
                if c.max_grad_norm > 0:
                    gnorms.append(float(torch.nn.utils.clip_grad_norm_(self._params, c.max_grad_norm)))
                    vnorms.append(float(torch.nn.utils.clip_grad_norm_(self._value_params, c.max_grad_norm)))
                if any(p.grad is not None for p in self._params):
                    self.optimizer.step()
                self.value_optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.value_optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.value_model.eval()
        nan = float("nan")
        return {"kept_update": kept / max(seen, 1), "pg_loss": sum(pg) / len(pg) if pg else nan,
                "value_loss": sum(vl) / len(vl) if vl else nan, "value_loss_first": vl[0] if vl else nan,
                "value_loss_last": vl[-1] if vl else nan,
                "grad_norm": sum(gnorms) / len(gnorms) if gnorms else nan,
                "value_grad_norm": sum(vnorms) / len(vnorms) if vnorms else nan}

    # ------------------------------------------------------------------ the step
    def step(self) -> dict:
        c, t0 = self.cfg, time.perf_counter()
        prompts = self._next_prompts()
        ro, scores, parts, rows = self._ppo_rollout(prompts, seed=c.seed * 1_000_003 + self.step_count)
        self.last_rollout = ro
        mask = completion_mask(rows)
        log = {"step": self.step_count + 1, "reward": float(scores.mean()), "reward_std": float(scores.std())
               if scores.numel() > 1 else 0.0, "completion_tokens": float(ro.completion_lengths().mean()),
               "value_mean": float(rows["values"][mask].mean()), "returns_mean": float(rows["returns"][mask].mean())}
        log.update({f"reward/{k}": v for k, v in parts.items()})
        if "ref_logps" in rows:   # the sequence KL(pi_old || pi_ref), k1 estimate summed over the completion
            diff = (rows["old_logps"].double() - rows["ref_logps"].double()) * mask
            log["kl"] = float(diff.sum(1).mean())
        if c.uses_target and self.step_count % c.refresh_every == 0:
            target, tstats = self._target_rows((ro, scores, rows))
            log.update(tstats)
            self._capture(self.scorer or self.engine, target)
        self.loss.reset()
        if c.iif:
            keep = self._iif_keep({k: rows[k] for k in POLICY_KEYS})
            self.loss.reset()
            log["kept"] = float(keep.double().mean())
            idx = keep.nonzero().flatten()
            nan = float("nan")
            upd = self._update({k: v[idx] for k, v in rows.items()}) if idx.numel() else \
                {"kept_update": 0.0, "pg_loss": nan, "value_loss": nan, "grad_norm": nan}
            upd.pop("kept_update")
        else:
            upd = self._update(rows)
            log["kept"] = upd.pop("kept_update")
        log["clip_frac"] = self.loss.clip_frac
        log.update(upd)
        log["seconds"] = time.perf_counter() - t0
        self.step_count += 1
        return log


__all__ = ["PPOConfig", "PPOPolicyLoss", "PPOTrainer", "ValueModel", "completion_mask", "gae", "token_rewards",
           "value_loss_sum", "value_model_from_causal_lm", "whiten"]
