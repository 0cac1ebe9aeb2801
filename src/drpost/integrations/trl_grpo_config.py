"""The options of :class:`drpost.integrations.trl_grpo.DrPostGRPOTrainer` and the checks of what it can
reproduce: ``DrPostGRPOOptions`` (the engine's options with RL defaults plus the target / IIF knobs),
``DrPostGRPOConfig(GRPOConfig, DrPostGRPOOptions)``, the ``loss_type`` values whose loss is a sum of
per-completion terms (and how TRL normalises each), and the refused combinations."""
from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..engine.options import DrPostOptions, OptionError, check_int, help_meta, option
from ..training_options import TARGET_LOSSES, TARGET_SOURCES

__all__ = ["DrPostGRPOConfig", "DrPostGRPOOptions", "SUPPORTED_LOSS_TYPES", "check_grpo_combination",
           "check_target_dataset"]

# loss_type -> how TRL normalises it: "tokens" (completion tokens of the accumulated step, all ranks) or
# "rows" (completions of the step: the mean of per-completion values)
SUPPORTED_LOSS_TYPES = {"dapo": "tokens", "cispo": "tokens", "grpo": "rows", "sapo": "rows", "dr_grpo": "rows"}
_REFUSED_LOSS_TYPES = {
    "bnpo": "it is a token mean per micro-batch, averaged over micro-batches and ranks, which is no sum of "
            "per-completion terms; use loss_type='dapo' (the token mean over the whole step)",
    "luspo": "it needs importance_sampling_level='sequence', which DrPostGRPOTrainer does not support",
    "vespo": "its Gamma weights are not implemented in drpost's per-completion loss; use 'dapo' or 'cispo'",
}


@dataclass
class DrPostGRPOOptions(DrPostOptions):
    """The engine's options (RL defaults: ``feasible_set='filter'``, ``frac=1.0``, the separate target
    strategy, ``refresh_every`` = optimisation steps between target refreshes) plus the RL ones."""

    feasible_set: str = option("feasible_set", "filter")
    frac: float = option("frac", 1.0)
    target_strategy: str = option("target_strategy", "separate")
    iif: bool = field(default=False, metadata=help_meta(
        "The IIF baseline: score each rollout once (global filter), drop the negatively scored completions, "
        "train plainly on the rest (feasible_set must be 'standard' or 'filter')."))
    target_loss: str = field(default="reward", metadata=help_meta(
        "Target loss: 'reward' (z-scored reward x completion log-prob) or 'train-loss' (the GRPO objective at "
        "ratio 1).", TARGET_LOSSES))
    target_source: str = field(default="pool", metadata=help_meta(
        "'pool': rollouts of target_batch prompts of target_dataset; 'self': the rollout being trained on.",
        TARGET_SOURCES))
    target_batch: int = field(default=4, metadata=help_meta(
        "target_source='pool': target prompts rolled out (num_generations times each) per refresh."))

    @property
    def uses_target(self) -> bool:
        return self.iif or self.feasible_set != "standard"

    def check_grpo_drpost_options(self) -> None:
        self.check_options()
        for name, choices in (("target_loss", TARGET_LOSSES), ("target_source", TARGET_SOURCES)):
            if getattr(self, name) not in choices:
                raise OptionError(name, f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        check_int(self, "target_batch", 1, "a positive integer (target prompts per refresh)")
        if not isinstance(self.iif, bool):
            raise OptionError("iif", f"iif must be True or False, got {self.iif!r}")
        if self.target_strategy != "separate":
            raise OptionError("target_strategy", "DrPostGRPOTrainer captures the target gradient from target "
                                                 "rollouts before the update (target_strategy='separate'); "
                                                 f"'merged' cannot ride in a rollout's micro-batch, got "
                                                 f"{self.target_strategy!r}")
        if self.feasible_set == "target_only":
            raise OptionError("feasible_set", "feasible_set='target_only' would train on the target rollouts "
                                              "instead of the training ones; not supported by DrPostGRPOTrainer")
        if self.iif and self.feasible_set not in ("standard", "filter"):
            raise OptionError("feasible_set", "with iif=True the rollout is filtered once and then trained plainly, "
                                              "so feasible_set must be 'standard' or 'filter' (only its frac is "
                                              f"used), got {self.feasible_set!r}")


@dataclass
class DrPostGRPOConfig(GRPOConfig, DrPostGRPOOptions):
    """TRL's ``GRPOConfig`` plus the Dr. Post-Training options (:class:`DrPostGRPOOptions`), so
    ``TrlParser`` offers them all as flags. ``seed`` is GRPOConfig's; it seeds drpost and the target
    rollouts too."""

    def __post_init__(self):
        try:
            self.check_grpo_drpost_options()
        except OptionError as err:
            raise OptionError(err.option, f"{type(self).__name__}: {err}") from None
        GRPOConfig.__post_init__(self)
        check_grpo_combination(self)


def check_grpo_combination(args) -> None:
    """Refuse GRPO settings whose loss drpost cannot reproduce per completion (a clear ValueError)."""
    name = type(args).__name__
    lt = args.loss_type
    if lt in _REFUSED_LOSS_TYPES:
        raise ValueError(f"{name}: loss_type={lt!r} is not supported by DrPostGRPOTrainer: {_REFUSED_LOSS_TYPES[lt]}; "
                         f"supported: {', '.join(SUPPORTED_LOSS_TYPES)}")
    if lt not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"{name}: unknown loss_type {lt!r}; DrPostGRPOTrainer supports {', '.join(SUPPORTED_LOSS_TYPES)}")
    refusals = [
        (args.importance_sampling_level != "token", "importance_sampling_level='sequence' (a sequence-level ratio)",
         "use importance_sampling_level='token'"),
        (args.top_entropy_quantile < 1.0, f"top_entropy_quantile={args.top_entropy_quantile} (a token mask from a "
         "quantile over every rank's tokens, not a per-completion loss)", "set top_entropy_quantile=1.0"),
        (args.off_policy_mask_threshold is not None, "off_policy_mask_threshold", "leave it None"),
        (bool(args.entropy_coef) or args.use_adaptive_entropy, "the entropy bonus (entropy_coef / "
         "use_adaptive_entropy)", "set entropy_coef=0 and use_adaptive_entropy=False"),
        (bool(getattr(args, "use_liger_kernel", False)), "use_liger_kernel (Liger's fused GRPO loss)",
         "set use_liger_kernel=False"),
    ]
    for bad, what, fix in refusals:
        if bad:
            raise ValueError(f"{name}: {what} is not supported by DrPostGRPOTrainer (drpost needs the loss as a sum "
                             f"of per-completion terms): {fix}")
    if SUPPORTED_LOSS_TYPES[lt] == "tokens" and args.steps_per_generation != args.gradient_accumulation_steps:
        raise ValueError(f"{name}: with loss_type={lt!r} TRL divides every micro-batch by the tokens of the whole "
                         f"generation batch x gradient_accumulation_steps / steps_per_generation, an estimate of the "
                         f"step's tokens that drpost does not reproduce (it normalises by the chosen completions' "
                         f"tokens of the step): set steps_per_generation = gradient_accumulation_steps "
                         f"({args.gradient_accumulation_steps}; got {args.steps_per_generation}) or use "
                         "loss_type='grpo'")


def check_target_dataset(args, target) -> None:
    """A target dataset the options need: present, a sized collection of prompt rows, >= target_batch."""
    if not (args.uses_target and args.target_source == "pool"):
        return
    if target is None:
        raise ValueError(f"feasible_set={args.feasible_set!r}{' with iif=True' if args.iif else ''} and "
                         "target_source='pool' need target prompts: pass target_dataset= (rows with 'prompt' and "
                         "the columns the reward functions read), or use target_source='self' (the step's own "
                         "rollout) or feasible_set='standard'")
    try:
        n = len(target)
    except TypeError:
        raise TypeError(f"target_dataset must be a list of dicts or a datasets.Dataset, got "
                        f"{type(target).__name__}") from None
    if n < args.target_batch:
        raise ValueError(f"the target dataset has {n} prompts, fewer than target_batch={args.target_batch}: pass "
                         "more target prompts, lower target_batch, or use target_source='self'")
    names = getattr(target, "column_names", None)
    if names is None:
        names = set(target[0].keys()) if hasattr(target[0], "keys") else set()
    if "prompt" not in names:
        raise ValueError(f"the target dataset needs a 'prompt' column (like GRPOTrainer's train_dataset); got "
                         f"{sorted(names)}")
