"""Every knob of the Dr. Post-Training engine, declared once: :class:`DrPostOptions`.

Each field carries its type, its default and its help text (``field(metadata={"help": ...})``,
as TRL's configs do); ``__post_init__`` holds the only checks; :meth:`DrPostOptions.fingerprint`
is what the ranks of a distributed run compare. Everything that configures the engine embeds
this class instead of repeating it:

* ``DataRegularizer(model, options=None, **overrides)``;
* ``DrPostArguments(TrainingArguments, DrPostTrainingOptions)`` (the HF argument parser sees the
  fields; :mod:`drpost.training_options` adds the trainers' ``target_batch_size``);
* the recipes' YAML ``drpost:`` section, the RL trainer's config, the demo and ``drpost bench``,
  whose command-line flags are generated from these fields (:func:`add_arguments`).

A front end that wants another default for a knob re-declares it with :func:`option`, which
copies the help text and choices of the original field: the knob is still owned here.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..feasible import FEASIBLE_SETS, SCOPES, check_frac
from ..scoring import BACKENDS, parse_sketch

TARGET_STRATEGIES = ("merged", "separate")
SCORE_NORMS = ("none", "per_token", "cosine")
NONFINITE = ("error", "skip")
GLOBAL_MEMORY = ("retain", "recompute")
# feasible sets whose decision scope is fixed by their definition (``scope`` is ignored for them)
FIXED_SCOPE = {"global": "global", "layerwise": "layer", "rowwise": "layer"}


AUTO_IS_TRAINER_LEVEL = (
    "frac='auto' is a trainer-level option: choosing frac online needs a held-out validation slice of "
    "target examples and a training loop that changes frac between steps, which DataRegularizer has not; "
    "use DrPostTrainer with DrPostArguments(frac='auto') (or `drpost train CONFIG --drpost.frac auto`), or "
    "give DataRegularizer a number in (0, 1] and change it between steps with DataRegularizer.set_frac(f)")


def is_auto(frac) -> bool:
    """Is ``frac`` the trainer-level setting 'auto' (any case)?"""
    return isinstance(frac, str) and frac.strip().lower() == "auto"


class OptionError(ValueError):
    """A bad value of one engine option; ``.option`` names it (front ends prefix their own key)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def help_meta(text: str, choices=None) -> dict:
    """Field metadata of an option: its help text and, when given, its choices."""
    meta = {"help": text}
    if choices is not None:
        meta["choices"] = list(choices)
    return meta


def check_int(obj: Any, name: str, low: int = 1, what: str | None = None) -> None:
    """OptionError unless ``obj.<name>`` is an integer >= ``low``."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OptionError(name, f"{name} must be {what or f'an integer >= {low}'}, got {value!r}")


@dataclass
class DrPostOptions:
    """The options of :class:`drpost.DataRegularizer` (see the field help texts)."""

    feasible_set: str = field(default="layerwise", metadata=help_meta(
        "Feasible set of update directions built from the general batch: 'standard' (plain training), "
        "'target_only', 'global', 'layerwise', 'rowwise', 'filter', 'greedy' or 'random'.", FEASIBLE_SETS))
    frac: float = field(default=0.5, metadata=help_meta(
        "Regularization strength in (0, 1]: top-k feasible sets keep k = max(1, floor(B * frac)) general "
        "samples per decision; 'filter' drops this share of the negatively scored samples. frac=1 keeps "
        "every sample (plain training for the top-k sets). The trainers (DrPostTrainer, drpost train) also "
        "take 'auto': frac chosen online among auto_fracs by the loss of a held-out slice of target examples."))
    scoring: str = field(default="auto", metadata=help_meta(
        "How the per-sample scores <G_i, g_T> are computed: 'reduced_ghost', 'pairwise_ghost', 'direct', "
        "'sketch' (approximate) or 'auto' (the cheapest exact back-end per layer).", BACKENDS))
    target_strategy: str = field(default="merged", metadata=help_meta(
        "'merged': the target rows ride in the same forward/backward as the general batch; 'separate': the "
        "target gradient is captured first and reused for `refresh_every` steps.", TARGET_STRATEGIES))
    refresh_every: int = field(default=1, metadata=help_meta(
        "target_strategy='separate': recapture the target gradient every this many optimisation steps."))
    score_norm: str = field(default="none", metadata=help_meta(
        "Score normalisation before selection: 'none' (the paper), 'per_token' (s_i / T_i) or 'cosine'.",
        SCORE_NORMS))
    scope: str = field(default="layer", metadata=help_meta(
        "Decision scope of 'filter', 'greedy' and 'random': per 'layer' or one 'global' decision "
        "(global/layerwise/rowwise fix their own scope).", SCOPES))
    sketch: str = field(default="gaussian-64x64", metadata=help_meta(
        "Sketch of scoring='sketch': 'gaussian-K1xK2' or 'countsketch-K1xK2' (K1 projects the output-gradient "
        "side, K2 the input side)."))
    seed: int = field(default=0, metadata=help_meta(
        "Seed of the 'random' feasible set and of the sketches."))
    greedy_lr: float = field(default=1e-4, metadata=help_meta(
        "feasible_set='greedy': the step size eta of one SGD step along the token-mean update of the chosen "
        "samples, whose second-order Taylor gain greedy maximises (drpost.feasible.greedy_mask)."))
    nonfinite: str = field(default="error", metadata=help_meta(
        "On a NaN/inf loss, score, target gradient or assembled gradient: raise an 'error' naming it, or "
        "'skip' the optimisation step (every .grad set to None).", NONFINITE))
    direct_max_mb: float = field(default=256.0, metadata=help_meta(
        "Memory bound (MiB) of the per-sample gradients the 'direct' back-end materialises (it works in "
        "chunks above it; 'auto' never picks it above it)."))

    global_memory: str = field(default="retain", metadata=help_meta(
        "Global-scope sets (global, and filter/greedy/random with scope='global') decide after the whole "
        "backward: 'retain' keeps every layer's per-sample factors until then (one backward; each layer's "
        "are freed once its chosen samples are assembled); 'recompute' keeps only the scores and runs the "
        "backward a second time (retain_graph) to "
        "assemble the chosen samples layer by layer (peak memory as a per-layer set, the time of one more "
        "activation-gradient backward). Both give the same update.", GLOBAL_MEMORY))

    auto_calibration: str = field(default="measure", metadata=help_meta(
        "How scoring='auto' picks a layer's exact back-end: 'measure' (time the candidates once per layer "
        "shape on this machine, cached in ~/.cache/drpost or $DRPOST_CALIBRATION_CACHE; a distributed run "
        "uses the model so that every rank agrees) or 'model' (modelled FLOPs and memory traffic).",
        ("measure", "model")))

    def __post_init__(self):
        self.check_options()

    # ------------------------------------------------------------------ checks
    def check_options(self) -> None:
        """Every check of the engine's options (called by ``__post_init__``)."""
        for f in dataclasses.fields(DrPostOptions):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise OptionError(f.name, f"unknown {f.name} {value!r}; choose one of {', '.join(choices)}")
        self.check_frac_option()
        check_int(self, "refresh_every", 1, "a positive integer")
        check_int(self, "seed", 0)
        for name in ("greedy_lr", "direct_max_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not value > 0:
                raise OptionError(name, f"{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        if self.feasible_set == "greedy" and self.score_norm != "none":
            raise OptionError("score_norm", f"feasible_set='greedy' maximises the Taylor gain of the update from the "
                                            f"raw scores, so score_norm must be 'none', got {self.score_norm!r}")
        try:
            parse_sketch(self.sketch)
        except ValueError as err:
            raise OptionError("sketch", str(err)) from None

    def check_frac_option(self) -> None:
        """``frac`` is a number in (0, 1] (the trainers' options also accept 'auto')."""
        if is_auto(self.frac):
            raise OptionError("frac", AUTO_IS_TRAINER_LEVEL)
        try:
            check_frac(self.frac)
        except ValueError as err:
            raise OptionError("frac", str(err)) from None
        self.frac = float(self.frac)

    # ------------------------------------------------------------------ derived
    @property
    def decision_scope(self) -> str:
        """'layer' or 'global': the scope the feasible set decides in."""
        return FIXED_SCOPE.get(self.feasible_set, self.scope)

    @property
    def selects(self) -> bool:
        """Does this feasible set choose among the general samples (hooks needed)?"""
        return self.feasible_set not in ("standard", "target_only")

    @property
    def sketch_spec(self) -> tuple[str, int, int]:
        return parse_sketch(self.sketch)

    def engine_options(self) -> "DrPostOptions":
        """The plain :class:`DrPostOptions` part of a subclass (trainer or recipe options)."""
        return DrPostOptions(**{name: getattr(self, name) for name in option_names()})

    def fingerprint(self) -> dict:
        """What every rank of a distributed run must agree on (compared as digests)."""
        out = {name: getattr(self, name) for name in option_names()}
        out["decision_scope"] = self.decision_scope
        out["sketch"] = self.sketch_spec
        return out


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(DrPostOptions)]


def option(name: str, default: Any, cls: type | None = None) -> Any:
    """A dataclass field for a subclass that gives knob ``name`` of ``cls`` (default
    :class:`DrPostOptions`) another default; type, help text and choices stay the original's (and
    so do its checks)."""
    base = {f.name: f for f in dataclasses.fields(cls or DrPostOptions)}[name]
    return field(default=default, metadata=dict(base.metadata))


def overrides_of(options: DrPostOptions | None, **overrides) -> DrPostOptions:
    """``options`` (default: the defaults) with some fields replaced, checked again."""
    base = DrPostOptions() if options is None else options
    if not isinstance(base, DrPostOptions):
        raise TypeError(f"options must be a drpost.DrPostOptions, got {type(base).__name__}; pass the engine's "
                        "knobs as keywords (feasible_set='layerwise', frac=0.5, ...) or as DrPostOptions(...)")
    if is_auto(getattr(base, "frac", None)) or is_auto(overrides.get("frac")):   # a trainer's options, frac='auto'
        raise OptionError("frac", AUTO_IS_TRAINER_LEVEL)
    unknown = sorted(set(overrides) - set(option_names()))
    if unknown:
        raise TypeError(f"unknown drpost option(s) {unknown}; the options are {', '.join(option_names())}")
    return dataclasses.replace(base.engine_options(), **overrides) if overrides else base.engine_options()


# ------------------------------------------------------------------ command-line flags
def _flag_type(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        base = _flag_type(inner)

        def optional(text: str):
            return None if text.strip().lower() in ("none", "null") else base(text)
        optional.__name__ = getattr(base, "__name__", "value")
        return optional
    if tp is bool:
        raise TypeError("boolean options are added with BooleanOptionalAction")
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type = DrPostOptions, include=None, exclude=(),
                  defaults: dict | None = None, dashes: bool = True) -> list[str]:
    """Add one ``--flag`` per field of the dataclass ``cls`` (type, default, help and choices from the
    field); return the names added. ``include``/``exclude`` pick fields; ``defaults`` replaces some
    defaults (a front end's own). ``--score-norm`` and ``--score_norm`` are both accepted."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if (include is not None and f.name not in include) or f.name in exclude or not f.init:
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING
                                       else f.default_factory() if f.default_factory is not dataclasses.MISSING
                                       else None)
        text = f.metadata.get("help", "")
        flags = [f"--{f.name.replace('_', '-')}"] if dashes else []
        if f"--{f.name}" not in flags:
            flags.append(f"--{f.name}")
        kwargs: dict = {"dest": f.name, "default": default,
                        "help": text.replace("%", "%%") + " (default %(default)s)"}
        tp = hints[f.name]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _flag_type(tp)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(*flags, **kwargs)
        names.append(f.name)
    return names


def from_arguments(ns: argparse.Namespace, cls: type = DrPostOptions, **fixed):
    """An instance of ``cls`` from the flags :func:`add_arguments` added (absent fields keep defaults)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)}
    values.update(fixed)
    return cls(**values)
