"""Recipe config checks: the ranges and choices of every section, each error naming its key.

The ``drpost:`` and ``rl:`` sections check themselves (their options' ``__post_init__``, owned by
:mod:`drpost.engine.options` and :mod:`drpost.training_options`): :func:`build_section` turns
their :class:`~drpost.engine.options.OptionError` into a :class:`ConfigError` naming
``'<section>.<option>'``; :func:`validate` checks the rest and what spans sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from .config_values import ConfigError, coerce
from .engine.options import OptionError, is_auto

# spectrum methods that are not feasible sets: offline = LESS-style selection, then standard training
SPECTRUM_BASELINES = ("offline",)

RECIPES = ("sft", "rl")


def build_section(section: str, cls: type, values: dict):
    """``cls(**values)``; a bad option becomes a ConfigError naming ``'<section>.<option>'``."""
    try:
        return cls(**values)
    except OptionError as err:
        raise _option_error(f"{section}.{err.option}", cls, err, values.get(err.option)) from None


def _engine_accepts(key: str, options, **change) -> None:
    """The engine's own check of a value given elsewhere (a spectrum grid point), its error named ``key``."""
    try:
        dataclasses.replace(options.engine_options(), **change)
    except OptionError as err:
        raise _option_error(key, type(options), err, change.get(err.option)) from None


def _option_error(key: str, cls: type, err: OptionError, value: Any) -> ConfigError:
    text = str(err)
    text = f"config key {key!r}{text[len(err.option):]}" if text.startswith(err.option + " ") \
        else f"config key {key!r}: {text}"
    field = {f.name: f for f in dataclasses.fields(cls)}.get(err.option)
    choices = field.metadata.get("choices") if field is not None else None
    if choices and isinstance(value, str) and value not in choices:
        close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
        text += f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(text)


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r} {msg}, got {value!r}")


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")


def validate(cfg) -> None:
    """Range and choice checks of a :class:`drpost.config.Config` (types were checked while building; the
    ``drpost`` and ``rl`` sections checked themselves, :func:`build_section`)."""
    from transformers.trainer_utils import SchedulerType

    from drpost.data.sources import ON_BAD_ROW
    from drpost.data.tasks import SPEC_USE_KEYS, check_spec
    from drpost.evaluation.task import METRICS

    m, d, r, t, e = cfg.model, cfg.data, cfg.drpost, cfg.train, cfg.eval
    for section in (f.name for f in dataclasses.fields(cfg)):   # inf / nan never make sense as a setting
        part = getattr(cfg, section)
        for name in (f.name for f in dataclasses.fields(part)) if dataclasses.is_dataclass(part) else ():
            value = getattr(part, name)
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
    _check(0.0 <= d.offline_share <= 1.0, "data.offline_share", "must be in [0, 1] (0: no offline selection)",
           d.offline_share)
    _check(d.offline_warmup_steps is None or d.offline_warmup_steps >= 1, "data.offline_warmup_steps",
           "must be >= 1 or null (null: 10 % of train.steps)", d.offline_warmup_steps)

    _check(r.target_batch_size <= d.n_target, "drpost.target_batch_size",
           f"must be <= data.n_target ({d.n_target})", r.target_batch_size)
    if r.frac_auto:   # the validation slice comes out of the target examples
        _check(r.auto_holdout < d.n_target, "drpost.auto_holdout",
               f"must be < data.n_target ({d.n_target}) with drpost.frac: auto (the held-out validation slice "
               "would leave no target example for the target gradient); raise data.n_target or lower it",
               r.auto_holdout)
        _check(r.target_batch_size <= d.n_target - r.auto_holdout, "drpost.target_batch_size",
               f"must be <= data.n_target - drpost.auto_holdout ({d.n_target} - {r.auto_holdout}) with "
               "drpost.frac: auto (the target examples left after the validation slice)", r.target_batch_size)
        _check(cfg.recipe == "sft", "drpost.frac", "'auto' applies to the sft recipe only (the rl recipe has "
               "no validation slice); give drpost.frac a number in (0, 1]", r.frac)

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
    _check(t.gradient_checkpointing or not t.checkpoint_reentrant, "train.checkpoint_reentrant",
           "only applies with train.gradient_checkpointing: true", t.checkpoint_reentrant)
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
        if name not in SPECTRUM_BASELINES:
            from .feasible import FEASIBLE_SETS

            _choice("spectrum.methods", name, tuple(FEASIBLE_SETS) + SPECTRUM_BASELINES)
            _engine_accepts("spectrum.methods", r, feasible_set=name)
    _check(len(set(sp.methods)) == len(sp.methods), "spectrum.methods", "must not repeat a method", sp.methods)
    sp.seeds = [coerce(v, int, "spectrum.seeds") for v in sp.seeds]
    _check(len(sp.seeds) >= 1 and all(v >= 0 for v in sp.seeds) and len(set(sp.seeds)) == len(sp.seeds),
           "spectrum.seeds", "must be distinct integers >= 0", sp.seeds)
    sp.fracs = ["auto" if is_auto(v) else coerce(v, float, "spectrum.fracs") for v in sp.fracs]
    for frac in sp.fracs:
        if frac == "auto":   # frac chosen online by the trainer: its knobs are the drpost section's auto_*
            try:
                dataclasses.replace(r, frac="auto", feasible_set="layerwise")
            except OptionError as err:
                raise _option_error("spectrum.fracs", type(r), err, frac) from None
        else:
            _engine_accepts("spectrum.fracs", r, frac=frac)
    _check(len(sp.fracs) >= 1 and len(set(sp.fracs)) == len(sp.fracs), "spectrum.fracs",
           "must be distinct numbers in (0, 1] (or 'auto')", sp.fracs)

    _choice("recipe", cfg.recipe, RECIPES)
    _check(not (cfg.train.fsdp and cfg.recipe != "sft"), "train.fsdp",
           "applies to the sft recipe only (the rl recipe runs in one process)", cfg.train.fsdp)
    _check(not (cfg.data.offline_share and cfg.recipe != "sft"), "data.offline_share",
           "applies to the sft recipe only (the rl recipe has no general pool to select from)", cfg.data.offline_share)

    _check(bool(cfg.output_dir), "output_dir", "must be a directory path", cfg.output_dir)
    if cfg.run_name is not None:
        _check(bool(cfg.run_name) and "/" not in cfg.run_name and cfg.run_name not in (".", ".."), "run_name",
               "must be a plain directory name", cfg.run_name)

