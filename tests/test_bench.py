"""`drpost bench` smoke test (no timing assertions) and the phase timer."""

import json
import time

import pytest

import torch

from drpost import DataRegularizer
from drpost.cli import main
from drpost.profiling import PhaseTimer
from models_tiny import llama, make_batch


def test_bench_runs_and_writes_its_tables(tmp_path, capsys):
    args = ["bench", "--num-layers", "1", "--batch", "2", "--seq", "16", "--reps", "3", "--warmup", "0",
            "--configs", "layerwise:auto,global:sketch", "--out", str(tmp_path), "--no-progress", "--threads", "1",
            "--memory", "inprocess"]
    assert main(args) == 0
    md = tmp_path / "bench-B2-T16-V1-fp32-cpu.md"
    report = json.loads((tmp_path / "bench-B2-T16-V1-fp32-cpu.json").read_text())
    text = md.read_text()
    for variant in ("plain", "layerwise:auto", "global:sketch", "naive:vmap", "naive:two_pass"):
        assert f"| {variant} |" in text, variant
    rows = {r["config"]: r for r in report["rows"]}
    assert rows["plain"]["ratio"] == 1.0 and rows["plain"]["memory_ratio"] == 1.0
    for key in ("layerwise:auto", "global:sketch", "naive:two_pass"):
        r = rows[key]
        assert r["median_s"] > 0 and r["peak_mb"] > 0, key
        assert r["breakdown_s"], key
    assert {"forward", "backward", "scoring", "selection", "weight_grad", "assembly", "optimizer"} <= set(
        rows["layerwise:auto"]["breakdown_s"])
    assert {"activation_backward", "weight_grad", "forward", "optimizer"} <= set(rows["plain"]["breakdown_s"])
    # per layer type: every scored layer type's scoring and chosen-gradient time, adding up to the phase totals
    by_type = rows["layerwise:auto"]["breakdown_by_layer_type_s"]
    assert {"linear q_proj", "linear down_proj", "tied"} <= set(by_type["scoring"]), sorted(by_type["scoring"])
    for phase in ("scoring", "weight_grad"):
        assert sum(by_type[phase].values()) == pytest.approx(rows["layerwise:auto"]["breakdown_s"][phase])
    assert "By layer type" in text and "| linear q_proj |" in text
    assert "Breakdown" in capsys.readouterr().out
    # pair ratios (step i over plain step i) for wall and CPU time, and the ranking verdict
    assert len(report["times"]["plain"]) == len(report["cpu_times"]["plain"]) == 3
    for key in ("layerwise:auto", "global:sketch"):
        for kind, series in (("pair_ratio", "times"), ("cpu_pair_ratio", "cpu_times")):
            s = rows[key][kind]
            ratios = sorted(a / b for a, b in zip(report[series][key], report[series]["plain"]))
            assert s["n"] == 3 and s["median"] == pytest.approx(ratios[1]) and s["q1"] <= s["median"] <= s["q3"]
    pairs = report["ranking"]["ranked"] + report["ranking"]["unrankable"]
    assert report["ranking"]["by"] == "cpu_pair_ratio" and len(pairs) == 6       # 4 drpost/naive variants
    assert "pair ratio, CPU time" in text and ("too large to rank" in text or "Ranked by" in text)
    # why auto chose each back-end: every Linear layer measured (the tied embedding: reduced_ghost only)
    why = rows["layerwise:auto"]["backend_reasons"]
    assert sum(g["layers"] for g in why) == sum(rows["layerwise:auto"]["backends"].values())
    assert any(g["reason"].startswith("measured fastest:") for g in why)
    assert "Why `auto` chose each back-end" in text and "measured fastest:" in text


def test_bench_stats_pair_ratios_quartiles_and_ranking():
    from drpost import bench_stats as bs

    assert bs.pair_ratios([2.0, 3.0, 4.0], [1.0, 2.0, 0.0]) == [2.0, 1.5]
    s = bs.summary([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["q1"], s["median"], s["q3"], s["n"]) == (2.0, 3.0, 4.0, 5)
    assert bs.summary([1.2])["q1"] == bs.summary([1.2])["q3"] == 1.2
    rows = {"a": bs.summary([1.00, 1.01, 1.02]), "b": bs.summary([1.10, 1.11, 1.12]),
            "c": bs.summary([0.98, 1.03, 1.2])}
    ranked, unrankable = bs.rank(rows)
    assert ("a", "b") in ranked and ("a", "c") not in ranked
    assert ("a", "c") in unrankable and ("c", "b") in unrankable
    assert bs.too_noisy(rows["c"]) and not bs.too_noisy(rows["a"])


def test_bench_measures_memory_in_a_process_per_variant(tmp_path):
    args = ["bench", "--num-layers", "1", "--batch", "2", "--seq", "16", "--reps", "1", "--warmup", "0",
            "--breakdown-reps", "0", "--configs", "layerwise:auto", "--no-naive", "--out", str(tmp_path),
            "--no-progress", "--threads", "1"]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench-B2-T16-V1-fp32-cpu.json").read_text())
    assert "fresh process" in report["memory_kind"]
    rows = {r["config"]: r for r in report["rows"]}
    for key in ("plain", "layerwise:auto"):
        note = rows[key]["memory_note"]
        assert isinstance(note, dict), note  # not an error string from the child
        # the peak of the measured step is at least what was resident before it
        assert rows[key]["peak_mb"] >= note["rss_before_step_mb"] > 0
    assert rows["plain"]["memory_ratio"] == 1.0


def test_bench_live_memory_and_a_recompute_variant(tmp_path):
    """--memory live: the children's allocator unmaps freed blocks >= 128 KiB; a variant may name its
    global_memory (FEASIBLE_SET:SCORING:GLOBAL_MEMORY)."""
    args = ["bench", "--num-layers", "1", "--batch", "2", "--seq", "16", "--reps", "1", "--warmup", "0",
            "--breakdown-reps", "0", "--configs", "global:auto,global:auto:recompute", "--no-naive",
            "--out", str(tmp_path), "--no-progress", "--threads", "1", "--memory", "live"]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench-B2-T16-V1-fp32-cpu.json").read_text())
    assert "128 KiB" in report["memory_kind"]
    rows = {r["config"]: r for r in report["rows"]}
    for key in ("plain", "global:auto", "global:auto:recompute"):
        assert rows[key]["memory_note"]["mmap_threshold"] == str(128 * 1024), key
        assert rows[key]["peak_mb"] > 0
    assert rows["global:auto:recompute"]["backends"] == rows["global:auto"]["backends"]


def test_bench_with_activation_checkpointing(tmp_path):
    """--gradient-checkpointing: every decoder layer checkpointed for every variant, named in the report."""
    args = ["bench", "--num-layers", "2", "--batch", "2", "--seq", "16", "--reps", "1", "--warmup", "0",
            "--breakdown-reps", "0", "--configs", "layerwise:auto", "--no-naive", "--out", str(tmp_path),
            "--no-progress", "--threads", "1", "--memory", "off", "--gradient-checkpointing"]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench-B2-T16-V1-fp32-cpu-ckpt.json").read_text())
    assert report["config"]["gradient_checkpointing"] is True
    assert "activation checkpointing" in (tmp_path / "bench-B2-T16-V1-fp32-cpu-ckpt.md").read_text()
    from drpost.bench import BenchConfig, _Bench

    bench = _Bench(BenchConfig(num_layers=2, batch=2, seq=16, gradient_checkpointing=True, configs=["layerwise:auto"]))
    assert getattr(bench.model, "is_activation_checkpointing", None) or bench.model.is_gradient_checkpointing


def test_bench_amortises_the_separate_strategy_over_whole_refresh_cycles(tmp_path):
    """--target-strategy separate --refresh-every R: the report adds the ratio of the summed times over
    the first whole refresh cycles (one target refresh in every R steps), which the pair medians hide."""
    args = ["bench", "--num-layers", "1", "--batch", "2", "--seq", "16", "--reps", "5", "--warmup", "1",
            "--breakdown-reps", "0", "--configs", "layerwise:auto", "--no-naive", "--out", str(tmp_path),
            "--no-progress", "--threads", "1", "--memory", "off", "--target-strategy", "separate",
            "--refresh-every", "2"]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench-B2-T16-V1-fp32-cpu-separate2.json").read_text())
    rows = {r["config"]: r for r in report["rows"]}
    got, t, c = rows["layerwise:auto"]["cycle_ratio"], report["times"], report["cpu_times"]
    assert got["steps"] == 4 and got["refresh_every"] == 2
    assert got["wall"] == pytest.approx(sum(t["layerwise:auto"][:4]) / sum(t["plain"][:4]))
    assert got["cpu"] == pytest.approx(sum(c["layerwise:auto"][:4]) / sum(c["plain"][:4]))
    assert rows["plain"]["cycle_ratio"]["wall"] == 1.0
    # timed steps 1-5 after the warm-up's capture: the target is captured again at steps 2 and 4 only
    # (a re-attach between the variants keeps the cache; it used to force a capture at every step)
    assert rows["layerwise:auto"]["target_passes"] == 2 and rows["plain"]["target_passes"] is None
    text = (tmp_path / "bench-B2-T16-V1-fp32-cpu-separate2.md").read_text()
    assert "Amortised over whole refresh cycles" in text
    assert "Target passes in the timed steps: layerwise:auto 2 of 5." in text


def test_bench_variant_options():
    from drpost.bench import variant_options

    assert variant_options("global:auto:recompute") == dict(feasible_set="global", scoring="auto",
                                                             global_memory="recompute")
    assert variant_options("layerwise:sketch") == dict(feasible_set="layerwise", scoring="sketch")
    with pytest.raises(ValueError):
        variant_options("global")


@pytest.mark.parametrize("bad", ["layerwise:fast", "global:auto:twice", "global:auto:recompute:x"])
def test_bench_rejects_a_bad_variant(tmp_path, capsys, bad):
    assert main(["bench", "--configs", bad, "--out", str(tmp_path), "--no-progress"]) == 2
    assert "FEASIBLE_SET:SCORING[:GLOBAL_MEMORY]" in capsys.readouterr().err


def test_phase_timer_charges_exclusive_time():
    t = PhaseTimer()
    with t.phase("outer"):
        time.sleep(0.02)
        with t.phase("inner"):
            time.sleep(0.03)
    assert 0.015 < t.seconds["outer"] < 0.03 + 0.02 and t.seconds["inner"] >= 0.03


def test_profiling_and_reattaching_do_not_change_the_gradients():
    torch.manual_seed(0)
    model = llama(num_layers=2)
    general, target = make_batch(4, 12, seed=1), make_batch(1, 12, seed=2)
    grads = []
    for profiled in (False, True):
        reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5)
        if profiled:
            reg.detach()
            reg.attach()
            reg.attach()  # a no-op while attached
            reg.profiler = PhaseTimer()
        model.zero_grad(set_to_none=True)
        reg.backward(general, target)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        reg.detach()
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert reg.profiler.seconds["scoring"] > 0


@pytest.mark.parametrize("scoring", ["auto", "sketch", "reduced_ghost"])
def test_reattaching_a_separate_strategy_keeps_the_cached_target(scoring):
    """detach/attach rebuilds the layer groups; the cached target gradient (and its age) moves over to
    them, so the step after a re-attach is the one without it: no target pass (target_batch None is
    accepted), the same gradients. `drpost bench --target-strategy separate` detaches between variants
    and measured a refresh at every step while the re-attach dropped the cache."""
    import copy

    torch.manual_seed(0)
    model = llama(num_layers=1, tied=True)
    twin = copy.deepcopy(model)
    general, target = make_batch(3, 12, seed=1), make_batch(1, 12, seed=2)
    opts = dict(feasible_set="layerwise", target_strategy="separate", refresh_every=3, scoring=scoring)
    grads = []
    for m, reattach in ((model, True), (twin, False)):
        reg = DataRegularizer(m, **opts)
        reg.backward(general, target)
        m.zero_grad(set_to_none=True)
        if reattach:
            reg.detach()
            m(input_ids=general["input_ids"]).logits.sum().backward()  # a plain step in between
            m.zero_grad(set_to_none=True)
            reg.attach()
        reg.backward(general, None)  # age 1 of 3: the cached target is used
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        assert reg.steps_since_capture == 2 == reg.state_dict()["steps_since_capture"]
        reg.detach()
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_reattaching_after_freezing_a_layer_captures_the_target_again():
    """When the scored layers changed between detach and attach, the cache does not describe them."""
    model = llama(num_layers=1)
    general, target = make_batch(2, 12, seed=1), make_batch(1, 12, seed=2)
    reg = DataRegularizer(model, feasible_set="layerwise", target_strategy="separate", refresh_every=3)
    reg.backward(general, target)
    model.zero_grad(set_to_none=True)
    reg.detach()
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    reg.attach()
    with pytest.raises(ValueError, match="a target batch is required"):
        reg.backward(general, None)
    reg.backward(general, target)
    assert model.model.layers[0].mlp.down_proj.weight.grad is None
    assert reg.steps_since_capture == 1
    reg.detach()


def test_bench_flags_are_the_config_fields():
    """`drpost bench`'s flags are generated from BenchConfig, which embeds DrPostOptions: every engine
    knob the bench uses (all but the per-variant feasible_set and scoring) is a flag, and today's
    spellings still parse."""
    import argparse
    import dataclasses

    from drpost import DrPostOptions
    from drpost.bench import PER_VARIANT, BenchConfig, add_bench_arguments, bench_config_from_arguments

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(BenchConfig):
        if f.name not in PER_VARIANT:
            assert f"--{f.name.replace('_', '-')}" in flags, f.name
    used = [f.name for f in dataclasses.fields(DrPostOptions) if f.name not in PER_VARIANT]
    assert {"frac", "sketch", "seed", "target_strategy", "refresh_every"} <= set(used)
    cfg = bench_config_from_arguments(parser.parse_args(
        ["--num-layers", "2", "--target-strategy", "separate", "--refresh-every", "3", "--no-naive", "--frac", "0.25",
         "--configs", "layerwise:auto, global:sketch", "--freeze-embeddings", "--seed", "4", "--score-norm", "cosine"]))
    assert cfg.num_layers == 2 and cfg.naive is False and cfg.freeze_embeddings is True
    assert cfg.configs == ["layerwise:auto", "global:sketch"]
    assert cfg.engine_options() == DrPostOptions(frac=0.25, target_strategy="separate", refresh_every=3, seed=4,
                                                 score_norm="cosine")
    defaults = bench_config_from_arguments(parser.parse_args([]))
    assert defaults == BenchConfig()


def test_layer_types_of_the_breakdown():
    import models_tiny as mt
    from drpost.engine.pipeline import layer_type

    reg = DataRegularizer(mt.llama_lora(seed=5), feasible_set="layerwise")
    types = {layer_type(g) for g in reg._pipeline.groups}
    reg.detach()
    assert types == {"linear q_proj.lora_A", "linear q_proj.lora_B", "linear v_proj.lora_A", "linear v_proj.lora_B"}
    reg = DataRegularizer(mt.llama(tied=True, seed=1), feasible_set="layerwise")
    types = {layer_type(g) for g in reg._pipeline.groups}
    reg.detach()
    assert "tied" in types and "linear gate_proj" in types
