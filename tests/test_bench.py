"""`drpost bench` smoke test (no timing assertions) and the phase timer."""

import json
import time

import torch

from drpost import DataRegularizer
from drpost.cli import main
from drpost.profiling import PhaseTimer
from models_tiny import llama, make_batch


def test_bench_runs_and_writes_its_tables(tmp_path, capsys):
    args = ["bench", "--num-layers", "1", "--batch", "2", "--seq", "16", "--reps", "1", "--warmup", "0",
            "--configs", "layerwise:auto,global:sketch", "--out", str(tmp_path), "--no-progress", "--threads", "1"]
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
    assert "Breakdown" in capsys.readouterr().out


def test_bench_rejects_a_bad_variant(tmp_path, capsys):
    assert main(["bench", "--configs", "layerwise:fast", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "FEASIBLE_SET:SCORING" in capsys.readouterr().err


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
