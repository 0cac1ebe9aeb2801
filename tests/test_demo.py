"""Smoke test of `drpost demo`: the real model (truncated to 1 layer) and real data, 2 steps,
all five default methods; checks metrics.json, the plots, config.json and the printed table."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from drpost import cli  # noqa: E402
from drpost.recipes.demo import METHODS, DemoConfig, check_config  # noqa: E402
from drpost.recipes.demo_report import verdict as _verdict  # noqa: E402


def _finite_numbers(obj, path="metrics"):
    """Yield (path, value) for every number in a JSON tree."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{path}[{i}]")


def test_default_methods_are_the_comparison():
    assert METHODS == ("standard", "global", "layerwise", "random", "target_only")


def test_demo_two_steps_writes_metrics_plot_and_table(tmp_path, capsys):
    rc = cli.main(
        [
            "demo", "--steps", "2", "--num-layers", "1", "--n-test", "4", "--n-general", "40",
            "--eval-every", "1", "--max-length", "64", "--max-new-tokens", "4",
            "--methods", "standard,global,layerwise,random,target_only", "--out", str(tmp_path),
        ]
    )
    assert rc == 0
    runs = list(tmp_path.glob("demo-*"))
    assert len(runs) == 1
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 2
    assert config["methods"] == ["standard", "global", "layerwise", "random", "target_only"]

    results = metrics["results"]
    assert list(results) == ["standard", "global", "layerwise", "random", "target_only"]
    for method, r in results.items():
        assert len(r["history"]) == 2
        assert [c["step"] for c in r["curve"]] == [0, 1, 2]
        assert r["test_ppl_before"] == metrics["base"]["test_ppl"]
        assert r["test_ppl_best"] <= r["test_ppl_final"]
        assert r["final_over_best"] >= 1.0
        assert 0.0 <= r["rougeL"] <= 1.0
        assert r["seconds_per_step_median"] > 0
        assert r["history"][0]["general_loss"] is not None
        assert r["batch_headline_share"] is not None
    assert 0.0 <= metrics["base"]["rougeL"] <= 1.0
    # What the selection kept: a share of headline rows among the chosen (layer, row) pairs.
    for method in ("global", "layerwise", "random"):
        r = results[method]
        assert 0.0 <= r["chosen_headline_share"] <= 1.0
        for h in r["history"]:
            assert h["chosen_picks"] == 4 * 7  # k = 4 of 8 rows, 7 Linear layers in one block
    assert results["standard"]["chosen_headline_share"] == pytest.approx(results["standard"]["batch_headline_share"])
    assert results["target_only"]["chosen_headline_share"] is None
    heat = results["layerwise"]["layer_pick_rate"]
    assert heat["blocks"] == ["0"] and len(heat["rate"]) == 1 and len(heat["rate"][0]) == len(heat["steps"])
    ex = results["layerwise"]["example_mask"]
    assert len(ex["mask"]) == 7 and all(len(row) == 8 and sum(row) == 4 for row in ex["mask"])
    assert metrics["model_layers"] == 1
    assert metrics["data"]["tokenized"]["test"] == 4

    numbers = list(_finite_numbers(metrics))
    assert numbers
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad

    for name in ("demo.png", "ppl.png", "selection.png", "heatmap.png"):
        png = run / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["plot"] == str(run / "demo.png")
    headlines = json.loads((run / "headlines.json").read_text())
    assert set(headlines) == {"reference", "base", *results} and all(len(v) == 4 for v in headlines.values())

    out = capsys.readouterr().out
    assert "ppl before" in out and "ROUGE-L" in out and "headline share" in out
    for method in ("base model", *results):
        assert f"\n{method} " in out
    assert f"plot: {run / 'demo.png'}" in out
    assert "Single seed" in out
    assert (run / "summary.txt").read_text().startswith("method")


def test_bad_methods_are_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        check_config(DemoConfig(methods=("standard", "layerwize")))
    with pytest.raises(ValueError, match="twice"):
        check_config(DemoConfig(methods=("standard", "standard")))


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_demo_help_documents_the_budget(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--methods" in out and "15 minutes" in out and "LoRA" in out


def test_verdict_never_claims_a_win_from_noise_or_disagreeing_metrics():
    assert "no win" in _verdict(-0.5, -0.02, 0.005)  # both gaps within the probe's seed spread
    assert "opposite" in _verdict(-1.5, -0.06, -0.03)  # ppl better, ROUGE-L worse, both beyond
    assert "better on both metrics" in _verdict(-1.5, -0.06, 0.03)
    assert "one seed" in _verdict(-1.5, -0.06, 0.03)
    assert "worse on perplexity" in _verdict(1.5, 0.06, None)


def test_demo_under_torchrun_matches_one_process(tmp_path):
    """`drpost demo --nproc 2` relaunches itself under torchrun; each rank trains on half of every
    general batch and the run gives what one process gives (fp32: no autocast)."""
    common = ["demo", "--steps", "2", "--num-layers", "1", "--n-test", "4", "--n-general", "40",
              "--eval-every", "0", "--max-length", "48", "--no-rouge", "--no-autocast",
              "--methods", "standard,layerwise"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        assert cli.main(common + ["--nproc", str(n), "--out", str(out)]) == 0
        (run,) = list(out.glob("demo-*"))
        runs[n] = json.loads((run / "metrics.json").read_text())
    assert runs[2]["environment"]["processes"] == 2 and runs[1]["environment"]["processes"] == 1
    for method in ("standard", "layerwise"):
        one, two = runs[1]["results"][method], runs[2]["results"][method]
        assert two["test_ppl_final"] == pytest.approx(one["test_ppl_final"], rel=1e-4), method
        assert two["test_ppl_final"] != pytest.approx(runs[2]["base"]["test_ppl"], rel=1e-6)  # it trained
        for h1, h2 in zip(one["history"], two["history"]):
            assert h2["batch_rows"] == h1["batch_rows"] == 8
            if method == "layerwise":  # the same (layer, row) pairs kept, gathered from both ranks
                assert h2["chosen_picks"] == h1["chosen_picks"] == 4 * 7
                assert h2["chosen_headline_picks"] == h1["chosen_headline_picks"]


def test_demo_nproc_must_divide_the_batch(tmp_path, capsys):
    with pytest.raises(ValueError, match="split evenly"):
        from drpost.recipes.demo import DemoConfig, check_config

        check_config(DemoConfig(), world=3)
    assert cli.main(["demo", "--nproc", "0", "--out", str(tmp_path)]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err


def test_demo_runs_are_train_recipes_with_the_demo_settings(tmp_path, monkeypatch):
    """Every method of the demo is a `drpost train` Config: the demo's settings, one run directory each."""
    from drpost.recipes import demo
    from drpost.recipes.demo import demo_runs

    monkeypatch.setattr(demo, "native_bf16", lambda device_type: True)
    runs = demo_runs(DemoConfig(), tmp_path, world=2)
    assert [m for m, _ in runs] == list(METHODS)
    for method, cfg in runs:
        t, r = cfg.train, cfg.drpost
        assert (t.lr, t.batch_size, t.steps, t.max_grad_norm, t.lr_scheduler, t.bf16) == (5e-5, 4, 40, 0.0, "constant", True)
        assert t.lora_r == 0 and t.freeze_embeddings and t.eval_every == 10 and not t.save_final
        assert cfg.eval.n_test == cfg.data.test_size == 50 and cfg.eval.max_new_tokens == 24 and cfg.eval.first_line
        assert not cfg.eval.at_start  # step 0 is the base model, evaluated once
        assert r.feasible_set == method and r.nonfinite == "error"
        assert r.target_batch_size == (8 if method == "target_only" else 2)
        assert r.frac == (1.0 if method in ("standard", "target_only") else 0.5)
        assert cfg.run_dir == tmp_path / method
        weights = [e["weight"] for e in cfg.data.general]
        assert weights[0] == pytest.approx(0.1) and sum(weights) == pytest.approx(1.0)


def test_recipes_import_only_public_names_of_each_other():
    import ast
    from pathlib import Path

    import drpost.recipes as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in (
                    "sft", "rl", "spectrum", "demo", "demo_report", "selection_record", "common"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_demo_leaves_bf16_off_where_it_has_no_native_kernels(tmp_path, monkeypatch):
    """On a CPU without native bf16 GEMMs (AVX2 only) bf16 autocast is several times slower than fp32:
    the demo trains in fp32 there (--no-autocast is then the default), and asked for fp32 it stays fp32."""
    from drpost.recipes import demo

    monkeypatch.setattr(demo, "native_bf16", lambda device_type: False)
    assert all(not cfg.train.bf16 for _, cfg in demo.demo_runs(DemoConfig(), tmp_path))
    monkeypatch.setattr(demo, "native_bf16", lambda device_type: True)
    assert all(cfg.train.bf16 for _, cfg in demo.demo_runs(DemoConfig(), tmp_path))
    assert all(not cfg.train.bf16 for _, cfg in demo.demo_runs(DemoConfig(autocast=False), tmp_path))
