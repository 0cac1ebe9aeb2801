"""Smoke test of `drpost demo`: the real model (truncated to 1 layer) and real data, 2 steps."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from drpost import cli  # noqa: E402


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


def test_demo_two_steps_writes_finite_metrics(tmp_path, capsys):
    rc = cli.main(
        [
            "demo", "--steps", "2", "--num-layers", "1", "--n-test", "4", "--n-general", "40",
            "--eval-every", "1", "--methods", "standard,layerwise,target_only", "--out", str(tmp_path),
        ]
    )
    assert rc == 0
    runs = list(tmp_path.glob("demo-*/metrics.json"))
    assert len(runs) == 1
    metrics = json.loads(runs[0].read_text())

    results = metrics["results"]
    assert list(results) == ["standard", "layerwise", "target_only"]
    for method, r in results.items():
        assert len(r["history"]) == 2
        assert [c["step"] for c in r["curve"]] == [0, 1, 2]
        assert r["test_ppl_before"] > 0 and r["test_ppl_after"] > 0
        assert r["seconds_per_step_median"] > 0
        assert r["history"][0]["general_loss"] is not None
    assert results["layerwise"]["kept_share_by_kind"], "layerwise should report what it kept"
    assert metrics["model_layers"] == 1
    assert metrics["data"]["tokenized"]["test"] == 4

    numbers = list(_finite_numbers(metrics))
    assert numbers
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad

    out = capsys.readouterr().out
    assert "test ppl before" in out and "layerwise" in out


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out
