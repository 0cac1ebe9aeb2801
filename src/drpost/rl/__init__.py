"""Reinforcement learning with Dr. Post-Training: GRPO (verifiable rewards), RLOO (learned reward
model) and the IIF baseline, all on one small policy-gradient loop that hands every micro-batch to
:class:`drpost.DataRegularizer` (the feasible set is applied to the policy-gradient loss).

- :mod:`drpost.rl.rewards`: user reward functions (TRL's signature), checks, advantages;
- :mod:`drpost.rl.rollout`: sampling completions, building policy-gradient rows, log-probs;
- :mod:`drpost.rl.loss`: the per-token clipped policy-gradient loss (+ KL) the engine scores;
- :mod:`drpost.rl.grpo`: the loop (:class:`PolicyGradientTrainer`), GRPO and RLOO estimators;
- :mod:`drpost.rl.iif`: the IIF baseline (score the whole rollout once, drop negatives);
- :mod:`drpost.rl.reward_model`: a scalar-head reward model trained with the Bradley-Terry loss;
- :mod:`drpost.rl.tasks`: the offline tasks on BBC news (category, headline preference).
"""
from .grpo import PolicyGradientConfig, PolicyGradientTrainer
from .loss import PolicyLoss
from .rewards import RewardError, call_rewards, group_advantages, rloo_advantages, zscore_rewards

__all__ = ["PolicyGradientConfig", "PolicyGradientTrainer", "PolicyLoss", "RewardError", "call_rewards",
           "group_advantages", "rloo_advantages", "zscore_rewards"]
