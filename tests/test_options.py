"""DrPostOptions owns every engine knob: defaults, checks, overrides, flags, the rank fingerprint;
and the engine's warning when a selecting feasible set keeps every sample (k == B)."""
from __future__ import annotations

import argparse
import dataclasses
import warnings

import pytest
import torch

import models_tiny as mt
from test_engine_oracle import get_case

from drpost import DataRegularizer, DrPostOptions, OptionError
from drpost.engine import options as op


def test_every_field_has_help_text():
    for f in dataclasses.fields(DrPostOptions):
        assert f.metadata.get("help"), f"DrPostOptions.{f.name} has no help text"


@pytest.mark.parametrize("name,value", [
    ("feasible_set", "topk"), ("scoring", "ghost"), ("target_strategy", "both"), ("score_norm", "l2"),
    ("scope", "model"), ("nonfinite", "ignore"), ("frac", 0), ("frac", 1.5), ("frac", True), ("frac", "0.5"),
    ("refresh_every", 0), ("refresh_every", 1.5), ("seed", -1), ("greedy_lr", 0), ("greedy_lr", float("nan")),
    ("direct_max_mb", -1), ("sketch", "gauss-8"),
])
def test_bad_values_name_the_option(name, value):
    with pytest.raises(OptionError) as info:
        DrPostOptions(**{name: value})
    assert info.value.option == name
    assert isinstance(info.value, ValueError)


def test_greedy_needs_raw_scores():
    with pytest.raises(OptionError, match="score_norm must be 'none'") as info:
        DrPostOptions(feasible_set="greedy", score_norm="cosine")
    assert info.value.option == "score_norm"


def test_overrides_replace_and_recheck():
    base = DrPostOptions(feasible_set="global", frac=0.25)
    assert op.overrides_of(base, frac=0.75).frac == 0.75
    assert op.overrides_of(base).feasible_set == "global"
    with pytest.raises(OptionError):
        op.overrides_of(base, frac=2.0)
    with pytest.raises(TypeError, match="unknown drpost option"):
        op.overrides_of(base, fracc=0.5)
    with pytest.raises(TypeError, match="DrPostOptions"):
        op.overrides_of("layerwise")


def test_regularizer_takes_options_and_overrides():
    case = get_case("tiny_lm")
    opts = DrPostOptions(feasible_set="global", frac=0.25, seed=3)
    reg = DataRegularizer(case.fresh(), opts, frac=0.5)
    assert (reg.feasible_set, reg.frac, reg.seed, reg.scope) == ("global", 0.5, 3, "global")
    assert opts.frac == 0.25        # the caller's options are not modified
    reg.detach()


def test_option_copies_help_and_checks():
    @dataclasses.dataclass
    class Front(DrPostOptions):
        nonfinite: str = op.option("nonfinite", "skip")

    assert Front().nonfinite == "skip"
    meta = {f.name: f.metadata for f in dataclasses.fields(Front)}
    assert meta["nonfinite"] == {f.name: f.metadata for f in dataclasses.fields(DrPostOptions)}["nonfinite"]
    with pytest.raises(OptionError):
        Front(nonfinite="maybe")
    assert Front().engine_options() == DrPostOptions(nonfinite="skip")


def test_flags_generated_from_fields():
    parser = argparse.ArgumentParser()
    names = op.add_arguments(parser, DrPostOptions, include=["frac", "score_norm", "seed"], defaults={"seed": 7})
    assert names == ["frac", "score_norm", "seed"]
    ns = parser.parse_args(["--frac", "0.25", "--score-norm", "cosine"])
    assert (ns.frac, ns.score_norm, ns.seed) == (0.25, "cosine", 7)
    assert parser.parse_args(["--score_norm", "per_token"]).score_norm == "per_token"
    with pytest.raises(SystemExit):
        parser.parse_args(["--score-norm", "l2"])
    opts = op.from_arguments(ns, DrPostOptions, feasible_set="random")
    assert (opts.feasible_set, opts.frac, opts.score_norm, opts.seed) == ("random", 0.25, "cosine", 7)


def test_fingerprint_covers_every_option():
    fp = DrPostOptions().fingerprint()
    assert set(op.option_names()) <= set(fp)
    assert DrPostOptions(frac=0.25).fingerprint() != fp
    # layerwise fixes its own scope: the given scope does not change the decision
    assert DrPostOptions(scope="global").decision_scope == "layer"
    assert DrPostOptions(feasible_set="filter", scope="global").decision_scope == "global"


def _tiny_step(feasible, frac, rows):
    case = get_case("tiny_lm")
    general = {k: v[:rows].clone() for k, v in case.general.items()}
    reg = DataRegularizer(case.fresh(), feasible_set=feasible, frac=frac, pad_token_id=mt.PAD_ID)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg.backward(general, case.target)
        reg.backward(general, case.target)
    reg.detach()
    return [str(w.message) for w in caught if "keeps k =" in str(w.message)]


@pytest.mark.parametrize("feasible", ["layerwise", "global", "rowwise", "random", "greedy"])
def test_micro_batch_keeping_every_row_warns_once(feasible):
    msgs = _tiny_step(feasible, 0.5, 1)
    assert len(msgs) == 1, msgs
    assert "every sample" in msgs[0] and "batch size" in msgs[0]


@pytest.mark.parametrize("feasible,frac,rows", [("layerwise", 0.5, 2), ("layerwise", 1.0, 1), ("filter", 0.5, 1)])
def test_no_warning_when_selection_is_real_or_intended(feasible, frac, rows):
    assert _tiny_step(feasible, frac, rows) == []


def test_positional_feasible_set_is_refused_with_a_hint():
    case = get_case("tiny_lm")
    with pytest.raises(TypeError, match="feasible_set='layerwise'"):
        DataRegularizer(case.fresh(), "layerwise")
