"""`drpost spectrum`: the grid, the statistics (against hand-computed values), the tables and plots,
resume, bad input; and the target-like share the SFT recipe logs."""

import csv
import json
import shutil
import math
from pathlib import Path

import pytest
import torch

from drpost.cli import main
from drpost.config import ConfigError, load_config
from drpost.recipes.sft import _target_like_shares
from drpost.recipes.spectrum import format_summary, grid, point_config, summarise

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")


def _row(method, frac, seed, ppl, rouge, sps, kept=None):
    return {"method": method, "frac": frac, "kept": {"standard": 1.0, "target_only": 0.0}.get(method, frac),
            "seed": seed, "test_ppl": ppl, "rougeL": rouge, "best_ppl": ppl, "final_over_best": 1.0,
            "seconds_per_step": sps, "target_like_batch": 0.1, "target_like_chosen": kept, "metrics": ["rougeL"]}


def test_grid_runs_unconstrained_methods_once_per_seed(tmp_path):
    cfg = load_config(TINY, ["--spectrum.methods", "standard,layerwise,target_only", "--spectrum.seeds", "0,3",
                             "--spectrum.fracs", "0.25,0.5", "--output_dir", str(tmp_path)])
    names = [p.name for p in grid(cfg)]
    assert names == ["standard-seed0", "standard-seed3", "layerwise-frac0.25-seed0", "layerwise-frac0.25-seed3",
                     "layerwise-frac0.5-seed0", "layerwise-frac0.5-seed3", "target_only-seed0", "target_only-seed3"]
    pc = point_config(cfg, grid(cfg)[3])
    assert (pc.drpost.feasible_set, pc.drpost.frac, pc.train.seed) == ("layerwise", 0.25, 3)
    assert pc.train.save_final is False and pc.train.save_steps == 0  # spectrum.save_models is false
    assert pc.run_dir == tmp_path / "tiny_test" / "runs" / "layerwise-frac0.25-seed3"
    assert [p.kept for p in grid(cfg)][::2] == [1.0, 0.25, 0.5, 0.0]


def test_summary_statistics_match_hand_computed_values():
    runs = [_row("standard", None, 0, 20.0, 0.20, 2.0), _row("standard", None, 1, 24.0, 0.22, 2.0),
            _row("layerwise", 0.5, 0, 19.0, 0.25, 2.4, 0.3), _row("layerwise", 0.5, 1, 22.0, 0.23, 2.2, 0.2)]
    s = {x["method"]: x for x in summarise(runs)}
    lw = s["layerwise"]
    assert lw["n"] == 2 and lw["seeds"] == [0, 1]
    assert lw["test_ppl"] == pytest.approx(20.5)
    assert lw["test_ppl_se"] == pytest.approx(math.sqrt(((19 - 20.5) ** 2 + (22 - 20.5) ** 2) / 1) / math.sqrt(2))
    # paired by seed: (19 - 20, 22 - 24) = (-1, -2): mean -1.5, SE sd(-1,-2)/sqrt(2) = 0.5
    assert lw["d_test_ppl"] == pytest.approx(-1.5) and lw["d_test_ppl_se"] == pytest.approx(0.5)
    assert lw["d_rougeL"] == pytest.approx(0.03) and lw["d_rougeL_se"] == pytest.approx(0.02)
    assert lw["time_ratio"] == pytest.approx((1.2 + 1.1) / 2)
    assert lw["target_like_chosen"] == pytest.approx(0.25)
    assert s["standard"]["time_ratio"] == pytest.approx(1.0) and s["standard"]["d_test_ppl"] == 0.0
    table = format_summary(summarise(runs), ["rougeL"])
    lines = table.splitlines()
    assert lines[0].startswith("| method | frac | seeds | rougeL | ΔrougeL vs standard | test ppl")
    assert "| layerwise | 0.5 | 2 | 0.240 ± 0.010 | +0.030 ± 0.020 | 20.50 ± 1.50 | -1.50 ± 0.50 |" in table
    assert "10.0% → 25.0%" in table


def test_single_seed_has_no_standard_error():
    s = summarise([_row("standard", None, 0, 20.0, 0.2, 2.0), _row("random", 0.5, 0, 21.0, 0.1, 2.0)])
    assert s[1]["test_ppl_se"] is None and s[1]["d_test_ppl"] == pytest.approx(1.0)
    assert "21.00 |" in format_summary(s, ["rougeL"])


@pytest.mark.parametrize("override, message", [
    (["--spectrum.methods", "standard,layerwize"], "did you mean 'layerwise'"),
    (["--spectrum.methods", "standard,standard"], "must not repeat"),
    (["--spectrum.seeds", "0,0"], "distinct integers"),
    (["--spectrum.seeds", "0,x"], "spectrum.seeds"),
    (["--spectrum.fracs", "0.5,1.5"], "in (0, 1]"),
    (["--spectrum.methods", "[]"], "at least one method"),
])
def test_bad_grids_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config(TINY, override)


class _Reg:
    def __init__(self, masks):
        self.last_masks = masks


def test_target_like_share_counts_kept_layer_row_pairs():
    flags = torch.tensor([True, False, False, True])
    masks = {"a": torch.tensor([True, True, False, False]),          # keeps 1 of its 2 picks target-like
             "b": torch.tensor([[1, 0], [0, 0], [1, 1], [1, 1]]).bool()}  # rowwise: 3 of 5 output rows
    out = _target_like_shares("layerwise", flags, _Reg(masks))
    assert out["target_like_batch"] == 0.5
    assert out["target_like_chosen"] == pytest.approx((1 + 3) / (2 + 5))
    assert _target_like_shares("standard", flags, None)["target_like_chosen"] == 0.5
    assert "target_like_chosen" not in _target_like_shares("target_only", flags, _Reg(masks))


def test_spectrum_end_to_end_resume_and_errors(tmp_path, capsys):
    args = ["spectrum", TINY, "--spectrum.methods", "standard,layerwise,target_only", "--spectrum.seeds", "0,1",
            "--train.steps", "2", "--train.eval_every", "1", "--eval.n_test", "2", "--output_dir", str(tmp_path),
            "--no-progress"]
    assert main(args) == 0
    out = tmp_path / "spectrum-tiny_test"
    for name in ("config.yaml", "runs.csv", "summary.csv", "summary.md", "spectrum.json", "spectrum.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("standard", "0"), ("standard", "1"), ("layerwise", "0"),
                                                         ("layerwise", "1"), ("target_only", "0"), ("target_only", "1")]
    assert all(math.isfinite(float(r["test_ppl"])) and math.isfinite(float(r["rougeL"])) for r in rows)
    assert not any((out / "runs" / r).joinpath("final").exists() for r in ("standard-seed0", "layerwise-seed0"))
    res = json.loads((out / "spectrum.json").read_text())
    assert res["complete"] and [s["method"] for s in res["summary"]] == ["standard", "layerwise", "target_only"]
    lw = next(s for s in res["summary"] if s["method"] == "layerwise")
    assert lw["n"] == 2 and lw["d_test_ppl"] is not None and 0.0 <= lw["target_like_chosen"] <= 1.0
    # the same seed shares the data draw: standard and layerwise start from the same step-0 perplexity
    assert rows[0]["start_ppl"] == rows[2]["start_ppl"] and rows[0]["start_ppl"] != rows[1]["start_ppl"]
    table = (out / "summary.md").read_text()
    assert "| layerwise | 0.5 | 2 |" in table and "| target_only | - | 2 |" in table

    # an existing spectrum is not overwritten by accident
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    # --resume keeps finished runs and redoes an unfinished one
    (out / "runs" / "layerwise-frac0.5-seed1" / "metrics.json").unlink()
    kept = (out / "runs" / "standard-seed0" / "metrics.json").stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    text = capsys.readouterr().out
    assert text.count("keeping the finished run") == 5
    assert (out / "runs" / "standard-seed0" / "metrics.json").stat().st_mtime_ns == kept
    assert (out / "runs" / "layerwise-frac0.5-seed1" / "metrics.json").is_file()
    # a fresh clone has the spectrum's files but not the run directories: their rows are kept
    shutil.rmtree(out / "runs" / "target_only-seed1")
    before = json.loads((out / "spectrum.json").read_text())["runs"][-1]
    assert main(args + ["--resume"]) == 0
    assert capsys.readouterr().out.count("keeping the finished run") == 6
    assert not (out / "runs" / "target_only-seed1").exists()
    assert json.loads((out / "spectrum.json").read_text())["runs"][-1]["test_ppl"] == before["test_ppl"]
    # resuming with another recipe is refused
    assert main(args + ["--resume", "--train.lr", "0.01"]) == 2
    assert "train.lr" in capsys.readouterr().err
