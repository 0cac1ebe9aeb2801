"""The options of the trainers around the engine, each declared once and checked once.

* :class:`DrPostTrainingOptions`: :class:`~drpost.engine.options.DrPostOptions` plus what a
  supervised trainer adds (``target_batch_size``) and the front ends' default ``nonfinite='skip'``.
  The YAML ``drpost:`` section (:class:`drpost.config.DrPostConfig`) and
  :class:`drpost.integrations.DrPostArguments` both inherit it.
* :class:`PolicyGradientOptions`: the knobs of the policy-gradient loop (algorithm, IIF, the target
  loss and source, rollout and batch sizes, sampling, KL and clipping), shared by the YAML ``rl:``
  section (:class:`drpost.config.RLConfig`, which adds the task) and
  :class:`drpost.rl.PolicyGradientConfig` (which adds the engine's options and the optimiser's).

Checks raise :class:`~drpost.engine.options.OptionError` naming the option; front ends prefix their
own key (``'drpost.frac'``, ``'rl.group_size'``, ``DrPostArguments: ...``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .engine.options import DrPostOptions, OptionError, check_int, help_meta, is_auto, option, option_names
from .feasible import check_frac
from .frac_schedule import DEFAULT_AUTO_FRACS, FracSchedule

ALGORITHMS = ("grpo", "rloo", "ppo")
TARGET_LOSSES = ("reward", "train-loss")
TARGET_SOURCES = ("pool", "self")


def values_of(obj: Any, cls: type) -> dict:
    """The values of the fields ``cls`` declares, read from ``obj`` (an instance of a subclass of
    ``cls``): e.g. the DrPostOptions part of a recipe section, passed on without naming the fields."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}


@dataclass
class DrPostTrainingOptions(DrPostOptions):
    """The engine's options plus a supervised trainer's: the target batch drawn per step.

    ``seed`` is the trainer's own (``TrainingArguments.seed``, a recipe's ``train.seed``): it seeds
    drpost too, so a recipe never sets it in its ``drpost:`` section (:attr:`TRAINER_OWNED`)."""

    TRAINER_OWNED: ClassVar[tuple] = ("seed",)

    # a number in (0, 1] or 'auto' (Optional only so that HfArgumentParser reads the flag as text,
    # `--frac auto`; None is refused by the check)
    frac: Optional[Union[float, str]] = option("frac", 0.5)
    nonfinite: str = option("nonfinite", "skip")
    target_batch_size: int = field(default=2, metadata={"help": (
        "Target rows drawn per optimisation step (shared by all its micro-batches; with several processes, "
        "the whole target batch, split between the ranks).")})
    auto_fracs: list[float] = field(default_factory=lambda: list(DEFAULT_AUTO_FRACS), metadata={"help": (
        "frac='auto': the candidate fracs (distinct numbers in (0, 1]). Successive elimination: each round plays "
        "every remaining candidate for auto_every steps (in a seeded random order) and then drops the one whose "
        "segments lowered the validation-slice loss least (relative drop, mean over its segments; ties keep the "
        "larger frac), until one is left for the rest of training.")})
    auto_every: int = field(default=5, metadata={"help": (
        "frac='auto': optimisation steps per segment (one candidate frac played, then the validation slice "
        "evaluated once).")})
    auto_holdout: int = field(default=4, metadata={"help": (
        "frac='auto': target examples held out of the target set as the validation slice (never used for the "
        "target gradient); must leave at least target_batch_size target examples.")})

    def __post_init__(self):
        self.check_training_options()

    def check_training_options(self) -> None:
        """The engine's checks, then the trainer's."""
        self.check_options()
        check_int(self, "target_batch_size", 1, "a positive integer")
        self.check_auto_options()

    def check_frac_option(self) -> None:
        """``frac`` is a number in (0, 1] (a numeric text is read as one) or 'auto'."""
        if is_auto(self.frac):
            self.frac = "auto"
            return
        if isinstance(self.frac, str):
            try:
                self.frac = float(self.frac)
            except ValueError:
                raise OptionError("frac", f"frac must be a number in (0, 1] or 'auto', got {self.frac!r}") from None
        super().check_frac_option()

    @property
    def frac_auto(self) -> bool:
        return self.frac == "auto"

    def check_auto_options(self) -> None:
        """The knobs of frac='auto' (checked whatever frac is, so that a typo shows at once)."""
        fracs = self.auto_fracs
        if isinstance(fracs, (int, float, str)):
            fracs = [fracs]
        try:
            fracs = [float(f) for f in fracs]
            for f in fracs:
                check_frac(f)
        except (TypeError, ValueError):
            raise OptionError("auto_fracs", f"auto_fracs must be distinct numbers in (0, 1] (the candidates of "
                                            f"frac='auto'), got {self.auto_fracs!r}") from None
        if not fracs or len(set(fracs)) != len(fracs):
            raise OptionError("auto_fracs", f"auto_fracs must be a non-empty list of distinct numbers in (0, 1] "
                                            f"(the candidates of frac='auto'), got {self.auto_fracs!r}")
        self.auto_fracs = fracs
        check_int(self, "auto_every", 1, "a positive integer (optimisation steps per segment)")
        check_int(self, "auto_holdout", 1, "a positive integer (target examples held out as the validation slice)")
        if self.frac_auto and not self.selects:
            raise OptionError("frac", f"frac='auto' needs a feasible set that has a frac; feasible_set="
                                      f"{self.feasible_set!r} has none (standard trains on every general row, "
                                      "target_only on none): choose e.g. layerwise, global, rowwise, filter, greedy "
                                      "or random, or give frac a number")

    def first_frac(self) -> float:
        """The frac a run starts with: ``frac``, or with 'auto' the first candidate the schedule plays."""
        return FracSchedule(self.auto_fracs, self.seed).frac if self.frac_auto else float(self.frac)

    def engine_options(self) -> DrPostOptions:
        """The engine's options; with frac='auto' those of the run's first step (the trainer changes frac
        between steps, ``DataRegularizer.set_frac``)."""
        values = {name: getattr(self, name) for name in option_names()}
        values["frac"] = self.first_frac()
        return DrPostOptions(**values)

    def trainer_values(self) -> dict:
        """What a trainer takes from a recipe's ``drpost:`` section (every field but the trainer's own)."""
        values = values_of(self, DrPostTrainingOptions)
        for name in self.TRAINER_OWNED:
            values.pop(name)
        return values


@dataclass
class DrPostTrainerOptions(DrPostTrainingOptions):
    """What the Trainer integrations add (:class:`drpost.integrations.DrPostArguments` on
    ``TrainingArguments``, :class:`drpost.integrations.DrPostSFTConfig` on TRL's ``SFTConfig``)."""

    n_target: int = field(
        default=16,
        metadata={"help": "Minimum number of rows the target dataset must have (a guard against passing "
                          "the wrong, too small split)."})
    selection_log: Optional[str] = field(
        default=None,
        metadata={"help": "Path of a JSON-lines file that gets, per optimisation step (main process), the "
                          "samples each layer chose (per micro-batch) and a SHA-256 digest of all selection "
                          "masks (with several processes: the main process's rows); on resume the lines after "
                          "the checkpoint's step are dropped, so an interrupted and resumed run writes the "
                          "same file as an uninterrupted one."})

    def __post_init__(self):
        self.check_trainer_options(type(self).__name__)

    def check_trainer_options(self, owner: str) -> None:
        """Every check of the drpost fields; errors are prefixed with ``owner`` (the arguments class)."""
        try:
            self.check_training_options()
            check_int(self, "n_target")
            if self.frac_auto and self.auto_holdout >= self.n_target:
                raise OptionError("auto_holdout", f"auto_holdout must be < n_target ({self.n_target}) with "
                                                  "frac='auto': the validation slice held out of the target "
                                                  "examples would leave none for the target gradient, got "
                                                  f"{self.auto_holdout}")
        except OptionError as err:
            raise OptionError(err.option, f"{owner}: {err}") from None


@dataclass
class PolicyGradientOptions:
    """The knobs of the policy-gradient loop (see the field help texts); checked in ``__post_init__``."""

    algorithm: Optional[str] = field(default="grpo", metadata=help_meta(
        "grpo (group-normalised rewards, KL loss term) | rloo (leave-one-out baseline, KL-shaped reward).",
        ALGORITHMS))
    iif: bool = field(default=False, metadata=help_meta(
        "The IIF baseline: score the whole rollout once (global filter), drop the negatives, train plainly."))
    target_loss: str = field(default="reward", metadata=help_meta(
        "reward (z-scored reward x log-prob) | train-loss (the RL objective itself).", TARGET_LOSSES))
    target_source: str = field(default="pool", metadata=help_meta(
        "pool (rollouts on target prompts) | self (the step's own rollout).", TARGET_SOURCES))
    target_batch: int = field(default=4, metadata=help_meta(
        "Target prompts rolled out per refresh of the target gradient (every refresh_every steps)."))
    prompts_per_step: int = field(default=4, metadata=help_meta("Training prompts rolled out per step."))
    group_size: int = field(default=4, metadata=help_meta("Completions per prompt."))
    micro_batch: int = field(default=8, metadata=help_meta(
        "Rows per forward/backward (drpost selects per micro-batch)."))
    mini_batches: int = field(default=1, metadata=help_meta("Optimiser steps per pass over a rollout."))
    epochs: int = field(default=1, metadata=help_meta("Passes over each rollout."))
    max_new_tokens: int = field(default=4, metadata=help_meta("Tokens sampled per completion."))
    temperature: float = field(default=1.0, metadata=help_meta("Sampling temperature of the rollouts."))
    beta: float = field(default=0.04, metadata=help_meta(
        "KL coefficient (GRPO: k3 loss term; RLOO: KL-shaped reward)."))
    clip_eps: float = field(default=0.2, metadata=help_meta("PPO-style ratio clipping of the policy-gradient loss."))
    system_prompt: Optional[str] = field(default="", metadata=help_meta(
        "System turn of the prompts ('': an empty one; None: the chat template's default)."))

    def __post_init__(self):
        self.check_policy_gradient_options()

    @property
    def policy_algorithm(self) -> Optional[str]:
        """The algorithm that runs (a subclass may derive it when ``algorithm`` is None)."""
        return self.algorithm

    def check_policy_gradient_options(self) -> None:
        algo = self.policy_algorithm
        for name, value, choices in (("algorithm", algo, ALGORITHMS), ("target_loss", self.target_loss, TARGET_LOSSES),
                                     ("target_source", self.target_source, TARGET_SOURCES)):
            if value not in choices:
                raise OptionError(name, f"{name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("target_batch", "prompts_per_step", "group_size", "micro_batch", "mini_batches", "epochs",
                     "max_new_tokens"):
            check_int(self, name)
        if not self.temperature > 0:
            raise OptionError("temperature", f"temperature must be > 0, got {self.temperature!r}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise OptionError("beta", f"beta must be a finite number >= 0, got {self.beta!r}")
        if not self.clip_eps > 0:
            raise OptionError("clip_eps", f"clip_eps must be > 0, got {self.clip_eps!r}")
        if self.mini_batches > self.prompts_per_step * self.group_size:
            raise OptionError("mini_batches", "mini_batches must be <= the rollout size (prompts_per_step * "
                                              f"group_size = {self.prompts_per_step * self.group_size}), got "
                                              f"{self.mini_batches!r}")
        if algo == "ppo" and not 0 < self.clip_eps < 1:
            raise OptionError("clip_eps", f"clip_eps must be in (0, 1) for PPO (the ratio is clipped to "
                                          f"[1 - clip_eps, 1 + clip_eps]), got {self.clip_eps!r}")
        if algo == "rloo" and self.group_size < 2:
            raise OptionError("group_size", "group_size must be >= 2 for RLOO (leave-one-out baseline), got "
                                            f"{self.group_size!r}")


@dataclass
class PPOOptions:
    """PPO's own knobs (the critic and GAE; :class:`drpost.rl.ppo.PPOTrainer`); checked by
    :meth:`check_ppo_options`. The rest of a PPO run is :class:`PolicyGradientOptions`'."""

    gamma: float = field(default=1.0, metadata=help_meta("PPO: GAE discount factor gamma in [0, 1]."))
    lam: float = field(default=0.95, metadata=help_meta("PPO: GAE lambda in [0, 1]."))
    cliprange_value: float = field(default=0.2, metadata=help_meta(
        "PPO: clipping range of the value prediction around the rollout's values (> 0)."))
    vf_coef: float = field(default=0.1, metadata=help_meta("PPO: weight of the value loss (the critic's own loss)."))
    value_lr: float = field(default=5e-4, metadata=help_meta("PPO: AdamW learning rate of the critic."))
    whiten_advantages: bool = field(default=True, metadata=help_meta(
        "PPO: whiten the GAE advantages over all completion tokens of the rollout."))

    def check_ppo_options(self) -> None:
        for name, low, high in (("gamma", 0.0, 1.0), ("lam", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise OptionError(name, f"{name} must be a number in [{low}, {high}], got {v!r}")
        for name in ("cliprange_value", "vf_coef", "value_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise OptionError(name, f"{name} must be a finite number > 0, got {v!r}")


def policy_gradient_option(name: str, default: Any) -> Any:
    """A field for a subclass giving policy-gradient knob ``name`` another default (help text kept)."""
    return option(name, default, PolicyGradientOptions)
