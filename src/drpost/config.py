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
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

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


class ConfigError(ValueError):
    """A bad recipe file or override; the message names the key."""


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


@dataclass
class DrPostConfig:
    feasible_set: str = "layerwise"  # standard|target_only|global|layerwise|rowwise|filter|greedy|random
    frac: float = 0.5  # regularization strength in (0, 1]
    scoring: str = "auto"  # auto|reduced_ghost|pairwise_ghost|direct|sketch
    target_strategy: str = "merged"  # merged | separate
    refresh_every: int = 1  # separate strategy: recapture the target gradient every N steps
    score_norm: str = "none"  # none | per_token | cosine
    scope: str = "layer"  # filter/greedy/random: per 'layer' or one 'global' decision
    sketch: str = "gaussian-64x64"  # scoring=sketch: 'gaussian-K1xK2' or 'countsketch-K1xK2'
    target_batch_size: int = 2  # target rows per optimisation step
    nonfinite: str = "skip"  # skip | error
    greedy_lr: float = 1e-4  # feasible_set=greedy: step size weighing the second-order term


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
    eval_every: int = 10  # held-out perplexity every N steps (0: only at the start and end)
    save_steps: int = 0  # checkpoint every N steps (0: none; needed for --resume)
    save_total_limit: Optional[int] = 1  # keep the last N checkpoints
    save_final: bool = True  # write the final weights (or LoRA adapter) to <run dir>/final
    log_selections: bool = False  # write <run dir>/selections.jsonl: chosen samples per layer and step
    logging_steps: int = 1  # log the training loss and selection statistics every N steps
    seed: int = 0
    threads: Optional[int] = None  # torch.set_num_threads (None: leave as is)


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
    methods: list = field(default_factory=lambda: list(SPECTRUM_METHODS))  # drpost.feasible_set values
    seeds: list = field(default_factory=lambda: [0, 1, 2])  # train.seed (and the data seed, unless data.seed)
    fracs: list = field(default_factory=lambda: [0.5])  # drpost.frac of the selecting methods
    save_models: bool = False  # keep each run's final weights (full fine-tuning: ~0.5 GB a run)


RL_TASKS = ("bbc_category", "bbc_headline")
RECIPES = ("sft", "rl")


@dataclass
class RLConfig:
    """``recipe: rl``: GRPO/RLOO with drpost feasible sets (drpost.rl). The RL recipe reads model,
    drpost (feasible_set, frac, scope, scoring, refresh_every, nonfinite), train (steps, lr, LoRA,
    bf16, seed, threads, max_grad_norm, weight_decay, eval_every, save_final) and this section; the
    data section and drpost.target_strategy/target_batch_size are not used (always separate)."""
    task: str = "bbc_category"  # bbc_category (verifiable: GRPO) | bbc_headline (preference: reward model + RLOO)
    algorithm: Optional[str] = None  # grpo | rloo (None: grpo for bbc_category, rloo for bbc_headline)
    iif: bool = False  # the IIF baseline: score the whole rollout once, drop negatives, train plainly
    target_loss: str = "reward"  # reward (z-scored reward x log-prob) | train-loss (the RL objective itself)
    target_source: str = "pool"  # pool (rollouts on target prompts) | self (the step's own rollout)
    target_batch: int = 4  # target prompts rolled out per refresh (drpost.refresh_every steps)
    n_train: int = 200  # training prompts
    n_target: int = 16  # target prompt pool
    n_test: int = 60  # held-out test prompts (greedy decoding)
    n_pairs: int = 128  # bbc_headline: reward-model preference pairs (80% train, 20% held out)
    prompt_words: int = 25  # words of the article in a prompt
    prompts_per_step: int = 4  # training prompts rolled out per step
    group_size: int = 4  # completions per prompt
    micro_batch: int = 8  # rows per forward/backward (drpost selects per micro-batch)
    mini_batches: int = 1  # optimiser steps per pass over a rollout
    epochs: int = 1  # passes over each rollout
    max_new_tokens: int = 3
    eval_max_new_tokens: Optional[int] = None  # None: max_new_tokens
    temperature: float = 1.0  # sampling temperature of the rollouts
    beta: float = 0.04  # KL coefficient (GRPO: k3 loss term; RLOO: KL-shaped reward)
    clip_eps: float = 0.2  # PPO-style ratio clipping of the policy-gradient loss
    system_prompt: Optional[str] = None  # None: the chat template's default system turn
    rm_epochs: int = 2  # reward model (bbc_headline): Bradley-Terry epochs over the pairs
    rm_lr: float = 1e-3  # reward model: AdamW learning rate
    rm_batch_size: int = 8  # reward model: preference pairs per step
    rm_lora_r: int = 8  # reward model: LoRA rank of its decoder
    reward_model_path: Optional[str] = None  # cache file of the trained reward model (loaded if it exists)


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


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    keys = [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _fields(cls)]
    return keys + list(TOP_LEVEL)


def _suggest(key: str) -> str:
    """' (did you mean 'x'?)' for an unknown key."""
    keys = valid_keys() + list(SECTIONS)
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


# ------------------------------------------------------------------------------------ values
class Raw(str):
    """A value typed on the command line (still text: converted according to the field type)."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


def _type_name(t) -> str:
    if typing.get_origin(t) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    return {type(None): "null", list: "a list", Any: "a value"}.get(t, getattr(t, "__name__", str(t)))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` (from YAML, or :class:`Raw` text from the command line) to ``typ``."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(typ) if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL and inner is not str) \
                or (isinstance(value, Raw) and value.strip().lower() in ("null", "none", "~")):
            return None
        return _coerce(value, inner, key)

    def bad(expected: str) -> ConfigError:
        kind = "command-line text" if isinstance(value, Raw) else type(value).__name__
        shown = repr(str(value)) if isinstance(value, Raw) else repr(value)
        return ConfigError(f"config key {key!r} must be {expected}, got {shown} ({kind})")

    if typ is Any:
        if isinstance(value, Raw):
            try:
                return yaml.safe_load(str(value))
            except yaml.YAMLError as err:
                raise ConfigError(f"config key {key!r}: cannot parse {value!r} as YAML: {err}") from None
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad("an integer") from None
                if f.is_integer():
                    return int(f)
        raise bad("an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad("a number")
    if typ is str:
        if isinstance(value, str):
            return str(value)
        raise bad("a string")
    if typ is list:
        if isinstance(value, Raw):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as err:
                    raise ConfigError(f"config key {key!r}: cannot parse {text!r} as a list: {err}") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad("a list")
    raise TypeError(f"no converter for {typ}")  # a schema bug


# ------------------------------------------------------------------------------------ building
def config_from_dict(raw: dict | None, origin: str = "") -> Config:
    """Build and validate a :class:`Config` from a nested dict (e.g. a parsed YAML file)."""
    raw = {} if raw is None else raw
    where = f" in {origin}" if origin else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections{where}, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name in TOP_LEVEL:
            kwargs[name] = _coerce(value, _fields(Config)[name], name)
        elif name in SECTIONS:
            cls = SECTIONS[name]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"config section {name!r}{where} must be a mapping of keys, got {value!r}")
            types = _fields(cls)
            values = {}
            for k, v in value.items():
                key = f"{name}.{k}"
                if k not in types:
                    raise _unknown(key, where)
                values[k] = _coerce(v, types[k], key)
            kwargs[name] = cls(**values)
        else:
            raise _unknown(str(name), where)
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
    return path


# ------------------------------------------------------------------------------------ overrides
def parse_overrides(args: list[str]) -> list[tuple[str, Raw]]:
    """``["--train.steps", "2", "--drpost.frac=0.25", "--train.bf16"]`` -> ``[(key, text), ...]``.

    A flag without a value (followed by another ``--flag`` or by nothing) means ``true``."""
    out, i = [], 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.key value or "
                              "--section.key=value")
        body = tok[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2
                                        and not _is_number(args[i + 1])):
            key, value = body, args[i + 1]
            i += 2
        else:
            key, value = body, "true"
            i += 1
        out.append((key.replace("-", "_"), Raw(value)))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


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


# ------------------------------------------------------------------------------------ validation
def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r} {msg}, got {value!r}")


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")


def validate(cfg: Config) -> None:
    """Range and choice checks (types were checked while building)."""
    from transformers.trainer_utils import SchedulerType

    from drpost import feasible as fs
    from drpost.data.sources import ON_BAD_ROW
    from drpost.data.tasks import SPEC_USE_KEYS, check_spec
    from drpost.engine import NONFINITE, SCORE_NORMS, TARGET_STRATEGIES
    from drpost.evaluation.task import METRICS
    from drpost.scoring import BACKENDS, parse_sketch

    m, d, r, t, e = cfg.model, cfg.data, cfg.drpost, cfg.train, cfg.eval
    for section, cls in SECTIONS.items():        # inf / nan never make sense as a setting
        for name in _fields(cls):
            value = getattr(getattr(cfg, section), name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{section}.{name}' must be a finite number, got {value}")
    _check(bool(m.name), "model.name", "must be 'smollm2' or a local model directory", m.name)
    _check(m.num_layers is None or m.num_layers >= 1, "model.num_layers", "must be >= 1 or null", m.num_layers)
    _choice("model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
    _choice("model.attn_implementation", m.attn_implementation, ("sdpa", "eager"))

    try:
        d.target = check_spec(d.target, "data.target")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check(isinstance(d.general, list), "data.general", "must be a list of task/source specs", d.general)
    general = []
    for i, entry in enumerate(d.general):
        where = f"data.general[{i}]"
        try:
            entry = check_spec(entry, where, extra_keys=SPEC_USE_KEYS)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if "count" in entry and "weight" in entry:
            raise ConfigError(f"{where}: give 'count' or 'weight', not both")
        if "count" in entry:
            c = entry["count"]
            _check(isinstance(c, int) and not isinstance(c, bool) and c >= 0, f"{where}.count",
                   "must be an integer >= 0", c)
        if "weight" in entry:
            w = entry["weight"]
            _check(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 and math.isfinite(w),
                   f"{where}.weight", "must be a number >= 0", w)
        general.append(entry)
    d.general = general
    _check(d.n_target >= 1, "data.n_target", "must be >= 1", d.n_target)
    _check(d.test_size >= 1, "data.test_size", "must be >= 1", d.test_size)
    _check(d.n_general is None or d.n_general >= 0, "data.n_general", "must be >= 0 or null", d.n_general)
    if d.n_general is None and any("count" not in g for g in general):
        raise ConfigError("config key 'data.n_general' is null, so every data.general entry needs a 'count' "
                          "(entries with a 'weight' share data.n_general)")
    _check(0.0 <= d.target_share < 1.0, "data.target_share", "must be in [0, 1)", d.target_share)
    _check(d.max_seq_length >= 8, "data.max_seq_length", "must be >= 8", d.max_seq_length)
    _choice("data.overlong", d.overlong, ("truncate", "drop"))
    _choice("data.on_bad_row", d.on_bad_row, ON_BAD_ROW)
    _check(d.seed is None or d.seed >= 0, "data.seed", "must be >= 0 or null", d.seed)

    _choice("drpost.feasible_set", r.feasible_set, fs.FEASIBLE_SETS)
    _check(0.0 < r.frac <= 1.0, "drpost.frac", "must be in (0, 1]", r.frac)
    _choice("drpost.scoring", r.scoring, BACKENDS)
    _choice("drpost.target_strategy", r.target_strategy, TARGET_STRATEGIES)
    _choice("drpost.score_norm", r.score_norm, SCORE_NORMS)
    _choice("drpost.scope", r.scope, fs.SCOPES)
    _choice("drpost.nonfinite", r.nonfinite, NONFINITE)
    try:
        parse_sketch(r.sketch)
    except ValueError as err:
        raise ConfigError(f"config key 'drpost.sketch': {err}") from None
    _check(r.refresh_every >= 1, "drpost.refresh_every", "must be >= 1", r.refresh_every)
    _check(r.target_batch_size >= 1, "drpost.target_batch_size", "must be >= 1", r.target_batch_size)
    _check(r.target_batch_size <= d.n_target, "drpost.target_batch_size",
           f"must be <= data.n_target ({d.n_target})", r.target_batch_size)
    _check(r.greedy_lr > 0, "drpost.greedy_lr", "must be > 0", r.greedy_lr)

    _check(t.steps >= 1, "train.steps", "must be >= 1", t.steps)
    _check(t.lr > 0 and math.isfinite(t.lr), "train.lr", "must be a positive number", t.lr)
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    _check(t.grad_accum >= 1, "train.grad_accum", "must be >= 1", t.grad_accum)
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", t.warmup_steps)
    _choice("train.optimizer", t.optimizer, ("adamw", "meso"))
    _check(t.meso_rank >= 1, "train.meso_rank", "must be >= 1", t.meso_rank)
    _check(t.meso_refresh >= 0, "train.meso_refresh", "must be >= 0 (0: never)", t.meso_refresh)
    _choice("train.lr_scheduler", t.lr_scheduler, [s.value for s in SchedulerType])
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0: no clipping)", t.max_grad_norm)
    _check(t.lora_r >= 0, "train.lora_r", "must be >= 0 (0: full fine-tuning)", t.lora_r)
    _check(t.lora_alpha > 0, "train.lora_alpha", "must be > 0", t.lora_alpha)
    _check(0.0 <= t.lora_dropout < 1.0, "train.lora_dropout", "must be in [0, 1)", t.lora_dropout)
    _check(all(isinstance(x, str) for x in t.lora_targets) and (t.lora_r == 0 or t.lora_targets),
           "train.lora_targets", "must be a non-empty list of module names", t.lora_targets)
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only at the start and end)", t.eval_every)
    _check(t.save_steps >= 0, "train.save_steps", "must be >= 0 (0: no checkpoints)", t.save_steps)
    _check(t.save_total_limit is None or t.save_total_limit >= 1, "train.save_total_limit", "must be >= 1 or null",
           t.save_total_limit)
    _check(t.logging_steps >= 1, "train.logging_steps", "must be >= 1", t.logging_steps)
    _check(t.seed >= 0, "train.seed", "must be >= 0", t.seed)
    _check(t.threads is None or t.threads >= 1, "train.threads", "must be >= 1 or null", t.threads)

    if e.metrics is not None:
        for name in e.metrics:
            _choice("eval.metrics", name, METRICS)
    _check(e.n_test is None or e.n_test >= 1, "eval.n_test", "must be >= 1 or null", e.n_test)
    _check(e.max_new_tokens is None or e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1 or null",
           e.max_new_tokens)
    _check(e.batch_size >= 1, "eval.batch_size", "must be >= 1", e.batch_size)

    sp = cfg.spectrum
    _check(len(sp.methods) >= 1, "spectrum.methods", "must list at least one method", sp.methods)
    for name in sp.methods:
        _choice("spectrum.methods", name, fs.FEASIBLE_SETS)
    _check(len(set(sp.methods)) == len(sp.methods), "spectrum.methods", "must not repeat a method", sp.methods)
    sp.seeds = [_coerce(v, int, "spectrum.seeds") for v in sp.seeds]
    _check(len(sp.seeds) >= 1 and all(v >= 0 for v in sp.seeds) and len(set(sp.seeds)) == len(sp.seeds),
           "spectrum.seeds", "must be distinct integers >= 0", sp.seeds)
    sp.fracs = [_coerce(v, float, "spectrum.fracs") for v in sp.fracs]
    _check(len(sp.fracs) >= 1 and all(0.0 < v <= 1.0 for v in sp.fracs) and len(set(sp.fracs)) == len(sp.fracs),
           "spectrum.fracs", "must be distinct numbers in (0, 1]", sp.fracs)

    _choice("recipe", cfg.recipe, RECIPES)
    _validate_rl(cfg.rl)

    _check(bool(cfg.output_dir), "output_dir", "must be a directory path", cfg.output_dir)
    if cfg.run_name is not None:
        _check(bool(cfg.run_name) and "/" not in cfg.run_name and cfg.run_name not in (".", ".."), "run_name",
               "must be a plain directory name", cfg.run_name)


def _validate_rl(rl: RLConfig) -> None:
    _choice("rl.task", rl.task, RL_TASKS)
    if rl.algorithm is not None:
        _choice("rl.algorithm", rl.algorithm, ("grpo", "rloo"))
    _choice("rl.target_loss", rl.target_loss, ("reward", "train-loss"))
    _choice("rl.target_source", rl.target_source, ("pool", "self"))
    for key in ("target_batch", "n_train", "n_target", "n_test", "n_pairs", "prompt_words", "prompts_per_step",
                "group_size", "micro_batch", "mini_batches", "epochs", "max_new_tokens", "rm_epochs", "rm_batch_size"):
        _check(getattr(rl, key) >= 1, f"rl.{key}", "must be >= 1", getattr(rl, key))
    _check(rl.target_batch <= rl.n_target, "rl.target_batch", f"must be <= rl.n_target ({rl.n_target}), the size of "
           "the target pool", rl.target_batch)
    _check(rl.eval_max_new_tokens is None or rl.eval_max_new_tokens >= 1, "rl.eval_max_new_tokens",
           "must be >= 1 or null", rl.eval_max_new_tokens)
    _check(rl.temperature > 0, "rl.temperature", "must be > 0", rl.temperature)
    _check(rl.beta >= 0 and math.isfinite(rl.beta), "rl.beta", "must be >= 0", rl.beta)
    _check(rl.clip_eps > 0, "rl.clip_eps", "must be > 0", rl.clip_eps)
    _check(rl.rm_lr > 0, "rl.rm_lr", "must be > 0", rl.rm_lr)
    _check(rl.rm_lora_r >= 0, "rl.rm_lora_r", "must be >= 0 (0: the whole decoder trains)", rl.rm_lora_r)
    _check(rl.mini_batches <= rl.prompts_per_step * rl.group_size, "rl.mini_batches",
           "must be <= rl.prompts_per_step * rl.group_size (the rollout size)", rl.mini_batches)
    algo = rl.algorithm or ("grpo" if rl.task == "bbc_category" else "rloo")
    _check(algo != "rloo" or rl.group_size >= 2, "rl.group_size", "must be >= 2 for RLOO (leave-one-out baseline)",
           rl.group_size)
