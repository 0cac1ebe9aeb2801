"""Recipe configuration: YAML files -> nested dataclasses, command-line overrides, validation.

A recipe file (``configs/*.yaml``) has the top-level sections ``model``, ``data``, ``drpost``,
``train`` and ``eval``, plus ``output_dir`` and ``run_name``; every key is optional (defaults
below). Overrides come from the command line::

    drpost train configs/sft_bbc_headline.yaml --train.steps 20 --drpost.frac=0.25 --lr 1e-4

``--section.key value`` or ``--section.key=value``; a bare ``--key`` works when the key exists
in one section only (``--lr`` is ``train.lr``; ``--seed`` is ambiguous and says so). Values are
converted to the field's type (``1e-4`` -> float, ``true``/``false`` -> bool, ``null`` -> None,
``a,b`` or ``[a, b]`` -> list, YAML for the task specs ``data.target`` and ``data.general``); a
key inside a task spec is reached with a third component (``--data.target.sections tech``).

Every problem is a :class:`ConfigError` naming the key: an unknown key (with the closest valid
key, via difflib), a value of the wrong type, or one out of range.

The ``drpost:`` section *is* the engine's options (:class:`drpost.training_options.DrPostTrainingOptions`:
every :class:`drpost.DrPostOptions` knob with its help text and checks, plus ``target_batch_size``);
the ``rl:`` section is the policy-gradient loop's knobs (:class:`~drpost.training_options.PolicyGradientOptions`)
plus the task. Value conversion lives in :mod:`drpost.config_values`, the range checks in
:mod:`drpost.config_checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config_checks import RECIPES, SPECTRUM_BASELINES, build_section, validate  # noqa: F401 (public)
from .config_values import ConfigError, Raw, coerce, parse_overrides
from .engine.options import OptionError
from .training_options import (DrPostTrainingOptions, PolicyGradientOptions, PPOOptions, check_int,
                               policy_gradient_option)

__all__ = [
    "ConfigError",
    "Config",
    "ModelConfig",
    "DataConfig",
    "DrPostConfig",
    "TrainConfig",
    "EvalConfig",
    "RLConfig",
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "apply_overrides",
    "config_to_dict",
    "save_config",
    "valid_keys",
    "resolve_key",
    "validate",
]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The FEASIBILITY.md follow-up pool: target-like rows rare (10 % headlines of other sections).
DEFAULT_GENERAL = [
    {"task": "bbc_headline", "exclude_sections": ["tech"], "weight": 1},
    {"task": "bbc_category", "weight": 3},
    {"task": "chatterbot_qa", "weight": 3},
    {"task": "bbc_continuation", "weight": 3},
]


# ------------------------------------------------------------------------------------ schema
@dataclass
class ModelConfig:
    name: str = "smollm2"  # 'smollm2' (the embedded SmolLM2-135M-Instruct) or a local HF model directory
    num_layers: Optional[int] = None  # keep only the first N decoder layers (None: all)
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 (bf16 mixed precision is train.bf16)
    attn_implementation: str = "sdpa"  # sdpa | eager


@dataclass
class DataConfig:
    target: Any = field(default_factory=lambda: {"task": "bbc_headline", "sections": ["tech"]})  # target spec
    n_target: int = 16  # target examples, from the target task's own training split
    test_size: int = 100  # held-out test split of the target task (sources never used elsewhere)
    general: Any = field(default_factory=lambda: [dict(e) for e in DEFAULT_GENERAL])  # mixture of specs
    n_general: Optional[int] = 1000  # general pool size (None: the sum of the entries' counts)
    target_share: float = 0.0  # share of the pool drawn from the target task's training split, in [0, 1)
    max_seq_length: int = 112  # tokens per example
    overlong: str = "truncate"  # truncate (the prompt, by words) | drop
    system_prompt: Optional[str] = ""  # "" = an empty system turn; null = the chat template's default
    on_bad_row: str = "error"  # error | skip  (malformed rows of local sources)
    seed: Optional[int] = None  # data split/mixture seed (None: train.seed)
    offline_share: float = 0.0  # LESS-style offline selection: keep this share of the pool by gradient cosine (0: off)
    offline_warmup_steps: Optional[int] = None  # offline selection: plain warm-up steps before scoring (None: 10 % of train.steps)


# The ``drpost:`` section: every engine option (help texts and checks in drpost.engine.options) plus
# target_batch_size, nonfinite defaulting to 'skip'; its seed is train.seed (DrPostConfig.TRAINER_OWNED).
DrPostConfig = DrPostTrainingOptions


@dataclass
class TrainConfig:
    steps: int = 50  # optimisation steps
    lr: float = 5e-5  # peak learning rate
    batch_size: int = 8  # general rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimisation step
    bf16: bool = True  # bf16 autocast (fp32 master weights)
    weight_decay: float = 0.0  # AdamW / MeSO decoupled weight decay
    optimizer: str = "adamw"  # adamw | meso (AdamW with moments in a per-layer sketch space, drpost.optim.MeSO)
    meso_rank: int = 64  # meso: sketch width k of each side of a compressed weight (state k x k per matrix)
    meso_refresh: int = 200  # meso: re-draw the sketches (moment transport) every N steps (0: never)
    warmup_steps: int = 0  # linear warm-up steps of the learning rate
    lr_scheduler: str = "constant"  # any transformers SchedulerType
    max_grad_norm: float = 1.0  # 0 = no clipping
    lora_r: int = 0  # 0 = full fine-tuning; > 0 = LoRA of this rank (peft)
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))  # Linear modules given adapters
    freeze_embeddings: bool = True  # freeze the input embedding (and a tied lm_head)
    gradient_checkpointing: bool = False  # activation checkpointing of every decoder layer: recomputed in backward (less memory, more time)
    checkpoint_reentrant: bool = False  # with gradient_checkpointing: torch's use_reentrant (False: the non-reentrant implementation)
    eval_every: int = 10  # held-out perplexity every N steps (0: only at the start and end)
    save_steps: int = 0  # checkpoint every N steps (0: none; needed for --resume)
    save_total_limit: Optional[int] = 1  # keep the last N checkpoints
    save_final: bool = True  # write the final weights (or LoRA adapter) to <run dir>/final
    log_selections: bool = False  # write <run dir>/selections.jsonl: chosen samples per layer and step
    logging_steps: int = 1  # log the training loss and selection statistics every N steps
    seed: int = 0
    threads: Optional[int] = None  # torch.set_num_threads (None: leave as is)
    fsdp: bool = False  # shard the model with FSDP2 (fully_shard per decoder layer, then the root); torchrun only


@dataclass
class EvalConfig:
    metrics: Optional[list] = None  # generation metrics (None: the target task's natural ones; []: none)
    n_test: Optional[int] = None  # test examples evaluated (None: the whole test split)
    max_new_tokens: Optional[int] = None  # None: the task's
    first_line: Optional[bool] = None  # keep the first generated line only (None: the task's)
    batch_size: int = 16
    at_start: bool = True  # evaluate the model before training (step 0)


SPECTRUM_METHODS = ("standard", "global", "layerwise", "rowwise", "random", "target_only")



@dataclass
class SpectrumConfig:
    """``drpost spectrum``: the grid of runs (every other section is shared by all of them)."""
    methods: list = field(default_factory=lambda: list(SPECTRUM_METHODS))  # drpost.feasible_set values, or offline
    seeds: list = field(default_factory=lambda: [0, 1, 2])  # train.seed (and the data seed, unless data.seed)
    fracs: list = field(default_factory=lambda: [0.5])  # drpost.frac of the selecting methods
    save_models: bool = False  # keep each run's final weights (full fine-tuning: ~0.5 GB a run)


RL_TASKS = ("bbc_category", "bbc_headline")


@dataclass
class RLConfig(PolicyGradientOptions, PPOOptions):
    """``recipe: rl``: GRPO/RLOO with drpost feasible sets (drpost.rl). The RL recipe reads model,
    drpost (the engine's options; the target strategy is always separate, drpost.refresh_every is the
    steps between target refreshes), train (steps, lr, LoRA, bf16, seed, threads, max_grad_norm,
    weight_decay, eval_every, save_final, gradient_checkpointing) and this section: the policy-gradient knobs
    (:class:`drpost.training_options.PolicyGradientOptions`, help texts there) and the task. The data
    section and drpost.target_batch_size are not used."""
    algorithm: Optional[str] = policy_gradient_option("algorithm", None)  # None: grpo for bbc_category, rloo for bbc_headline; ppo: drpost.rl.ppo (critic + GAE, the rl.gamma ... knobs)
    max_new_tokens: int = policy_gradient_option("max_new_tokens", 3)  # tokens sampled per completion
    system_prompt: Optional[str] = policy_gradient_option("system_prompt", None)  # None: the chat template's default
    task: str = field(default="bbc_category", metadata={"choices": list(RL_TASKS)})  # bbc_category (verifiable: GRPO) | bbc_headline (preference: reward model + RLOO)
    n_train: int = 200  # training prompts
    n_target: int = 16  # target prompt pool
    n_test: int = 60  # held-out test prompts (greedy decoding)
    n_pairs: int = 128  # bbc_headline: reward-model preference pairs (80% train, 20% held out)
    prompt_words: int = 25  # words of the article in a prompt
    balanced: bool = False  # bbc_category: every split has the five sections in equal shares (a constant answer scores 1/5)
    eval_max_new_tokens: Optional[int] = None  # None: max_new_tokens
    rm_epochs: int = 2  # reward model (bbc_headline): Bradley-Terry epochs over the pairs
    rm_lr: float = 1e-3  # reward model: AdamW learning rate
    rm_batch_size: int = 8  # reward model: preference pairs per step
    rm_lora_r: int = 8  # reward model: LoRA rank of its decoder
    reward_model_path: Optional[str] = None  # cache file of the trained reward model (loaded if it exists)

    @property
    def policy_algorithm(self) -> Optional[str]:
        return self.algorithm or ("grpo" if self.task == "bbc_category" else "rloo")

    def __post_init__(self):
        if self.task not in RL_TASKS:
            raise OptionError("task", f"task must be one of {', '.join(RL_TASKS)}, got {self.task!r}")
        self.check_policy_gradient_options()
        self.check_ppo_options()
        for name in ("n_train", "n_target", "n_test", "n_pairs", "prompt_words", "rm_epochs", "rm_batch_size"):
            check_int(self, name)
        if self.balanced and self.task != "bbc_category":
            raise OptionError("balanced", f"rl.balanced applies to the bbc_category task, not {self.task!r}")
        if self.target_batch > self.n_target:
            raise OptionError("target_batch", f"target_batch must be <= rl.n_target ({self.n_target}), the size of "
                                              f"the target pool, got {self.target_batch!r}")
        if self.eval_max_new_tokens is not None:
            check_int(self, "eval_max_new_tokens")
        if not self.rm_lr > 0:
            raise OptionError("rm_lr", f"rm_lr must be > 0, got {self.rm_lr!r}")
        check_int(self, "rm_lora_r", low=0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    drpost: DrPostConfig = field(default_factory=DrPostConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    recipe: str = "sft"  # sft | rl (drpost train runs this recipe)
    output_dir: str = "runs"
    run_name: Optional[str] = None  # None: the config file's stem (or "sft")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / (self.run_name or "sft")

    @property
    def data_seed(self) -> int:
        return self.train.seed if self.data.seed is None else self.data.seed


SECTIONS = {"model": ModelConfig, "data": DataConfig, "drpost": DrPostConfig, "train": TrainConfig,
            "eval": EvalConfig, "spectrum": SpectrumConfig, "rl": RLConfig}
TOP_LEVEL = ("output_dir", "run_name", "recipe")
# Names users bring from Hugging Face TrainingArguments: only used to suggest the right key.
_ALIASES = {
    "learning_rate": "train.lr", "max_steps": "train.steps", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_steps": "train.steps",
    "eval_steps": "train.eval_every", "model_name_or_path": "model.name", "max_length": "data.max_seq_length",
    "lora_rank": "train.lora_r", "r": "train.lora_r", "strength": "drpost.frac",
}


# keys of the drpost section that another section sets: "drpost.seed" -> "train.seed"
_SET_ELSEWHERE = {f"drpost.{name}": f"train.{name}" for name in DrPostConfig.TRAINER_OWNED}


def _fields(cls) -> dict[str, Any]:
    """A section's keys and their types (the fields a recipe may set)."""
    hints = typing.get_type_hints(cls)
    hidden = getattr(cls, "TRAINER_OWNED", ())
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in hidden}


def valid_keys() -> list[str]:
    keys = [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _fields(cls)]
    return keys + list(TOP_LEVEL)


def _suggest(key: str) -> str:
    """' (did you mean 'x'?)' for an unknown key."""
    keys = valid_keys() + list(SECTIONS)
    if key in _SET_ELSEWHERE:
        return f": the trainer's {_SET_ELSEWHERE[key]} seeds drpost too; did you mean {_SET_ELSEWHERE[key]!r}?"
    bare = key.rsplit(".", 1)[-1]
    if bare in _ALIASES:
        return f"; did you mean {_ALIASES[bare]!r}?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # compare bare names ("stpes" -> "train.steps")
        by_bare = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_bare[m] for m in difflib.get_close_matches(bare, list(by_bare), n=1, cutoff=0.6)]
    if not close:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.3)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown(key: str, origin: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}{origin}{_suggest(key)}")


# ------------------------------------------------------------------------------------ building
def config_from_dict(raw: dict | None, origin: str = "") -> Config:
    """Build and validate a :class:`Config` from a nested dict (e.g. a parsed YAML file)."""
    raw = {} if raw is None else raw
    where = f" in {origin}" if origin else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections{where}, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    sections: dict[str, dict] = {}
    for name, value in raw.items():
        if name in TOP_LEVEL:
            kwargs[name] = coerce(value, _fields(Config)[name], name)
        elif name in SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"config section {name!r}{where} must be a mapping of keys, got {value!r}")
            types = _fields(SECTIONS[name])
            for k in value:
                if k not in types:
                    raise _unknown(f"{name}.{k}", where)
            sections[name] = {k: coerce(v, types[k], f"{name}.{k}") for k, v in value.items()}
        else:
            raise _unknown(str(name), where)
    for name in sorted(sections, key=lambda n: n != "train"):   # train first: it seeds drpost
        values = sections[name]
        if name == "drpost":
            values = {**values, **_set_elsewhere(kwargs.get("train"))}
        kwargs[name] = build_section(name, SECTIONS[name], values)
    if "train" in kwargs and "drpost" not in kwargs:
        kwargs["drpost"] = build_section("drpost", DrPostConfig, _set_elsewhere(kwargs["train"]))
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def _set_elsewhere(train: TrainConfig | None) -> dict:
    """The drpost options another section sets (the seed: train.seed; a bad train.seed is reported by
    :func:`validate` under its own name)."""
    values = {}
    for name in DrPostConfig.TRAINER_OWNED:
        value = getattr(train, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            values[name] = value
    return values


def config_to_dict(cfg: Config) -> dict:
    """The config as plain data (what ``save_config`` writes); keys set by another section are left out."""
    out = dataclasses.asdict(cfg)
    for key in _SET_ELSEWHERE:
        section, name = key.split(".")
        out[section].pop(name, None)
    return out


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
    return path


# ------------------------------------------------------------------------------------ overrides
def resolve_key(key: str) -> str:
    """Full dotted name of an override key (a bare key must exist in exactly one section)."""
    keys = valid_keys()
    if key in keys:
        return key
    parts = key.split(".")
    if len(parts) == 3 and ".".join(parts[:2]) in ("data.target",):
        return key
    if "." not in key:
        owners = [k for k in keys if k.rsplit(".", 1)[-1] == key]
        if len(owners) == 1:
            return owners[0]
        if len(owners) > 1:
            raise ConfigError(f"config key {key!r} is ambiguous: use one of {', '.join(owners)}")
    raise _unknown(key, " (command line)")


def apply_overrides(raw: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Apply ``(key, value)`` overrides to a raw config dict (a copy is returned)."""
    import copy

    raw = copy.deepcopy(raw or {})
    for key, value in overrides:
        full = resolve_key(key)
        parts = full.split(".")
        if len(parts) == 1:
            raw[parts[0]] = value
            continue
        section = raw.setdefault(parts[0], {})
        if section is None:
            section = raw[parts[0]] = {}
        if not isinstance(section, dict):
            raise ConfigError(f"config section {parts[0]!r} must be a mapping")
        if len(parts) == 2:
            section[parts[1]] = value
        else:  # a key inside a task spec, e.g. data.target.sections
            spec = section.get(parts[1], dataclasses.asdict(Config())[parts[0]][parts[1]])
            spec = {"task": spec} if isinstance(spec, str) else dict(spec)
            spec[parts[2]] = yaml.safe_load(str(value)) if isinstance(value, Raw) else value
            section[parts[1]] = spec
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | list[tuple[str, Any]] | None = None) -> Config:
    """Load a YAML recipe (``None``: the defaults), apply overrides, validate.

    ``overrides`` is a list of command-line tokens (``["--train.steps", "2"]``) or of
    ``(key, value)`` pairs. ``run_name`` defaults to the file's stem."""
    raw: dict = {}
    origin = ""
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        origin = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    if overrides:
        pairs = parse_overrides(overrides) if all(isinstance(o, str) for o in overrides) else list(overrides)
        raw = apply_overrides(raw, pairs)
        origin = origin + " + command line" if origin else "command line"
    if path is not None and raw.get("run_name") is None:
        stem = path.parent.name if path.name == "config.yaml" else path.stem
        raw = {**raw, "run_name": stem}
    return config_from_dict(raw, origin)
