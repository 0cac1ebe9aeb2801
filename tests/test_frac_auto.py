"""frac='auto': the successive-elimination schedule (on stubbed rewards and losses), the trainer that plays
it (the engine's k really changes, the validation slice never reaches a target gradient, exact resume
mid-exploration), the errors, the YAML / command-line / HfArgumentParser spellings, the SFT recipe end to
end and the spectrum grid point."""
import json
import math
from pathlib import Path

import models_tiny as mt
import pytest
import torch

from drpost import DataRegularizer
from drpost.config import ConfigError, config_to_dict, load_config, save_config
from drpost.engine.options import OptionError
from drpost.feasible import num_selected
from drpost.frac_schedule import FracSchedule
from drpost.integrations import DrPostArguments, DrPostTrainer
from drpost.integrations.auto_frac import AutoFrac

from test_trainer import assert_params_close, drpost_run, make_args, params_of, rows, target, train_logs

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")
AUTO = dict(frac="auto", auto_fracs=[0.25, 0.5, 1.0], auto_every=2, auto_holdout=4)


def play(schedule: FracSchedule, reward_of) -> list:
    """Play a schedule to its choice; reward_of(frac, n-th play of that frac) -> reward. The segments played."""
    played, count = [], {}
    while schedule.exploring:
        f = schedule.frac
        played.append((schedule.round, f))
        schedule.record(reward_of(f, count.get(f, 0)))
        count[f] = count.get(f, 0) + 1
        assert len(played) < 100
    return played


# --------------------------------------------------------------------------- the schedule alone
def test_schedule_eliminates_the_lowest_mean_reward_each_round():
    rewards = {0.125: 0.1, 0.25: 0.3, 0.5: 0.5, 0.75: 0.2, 1.0: 0.4}
    s = FracSchedule([1.0, 0.5, 0.125, 0.75, 0.25], seed=3)
    played = play(s, lambda f, n: rewards[f])
    assert s.chosen == 0.5 and s.frac == 0.5 and not s.exploring
    assert [f for _, f, _ in s.eliminated] == [0.125, 0.75, 0.25, 1.0]
    assert len(played) == 5 + 4 + 3 + 2
    by_round = {}
    for r, f in played:
        by_round.setdefault(r, []).append(f)
    alive = [0.125, 0.25, 0.5, 0.75, 1.0]
    for r in range(4):       # every round plays each alive candidate exactly once
        assert sorted(by_round[r]) == alive, r
        alive.remove(s.eliminated[r][1])
    with pytest.raises(RuntimeError, match="after the choice"):
        s.record(0.0)


def test_schedule_uses_the_mean_over_segments_not_the_last():
    # round 0: 0.25 -> 0.3, 0.5 -> 0.2, 1.0 -> 0.1: 1.0 goes. round 1: 0.25 -> 0.15 (mean 0.225), 0.5 -> 0.2
    # (mean 0.2): by the last reward 0.25 would go, by the mean 0.5 goes
    seq = {0.25: [0.3, 0.15], 0.5: [0.2, 0.2], 1.0: [0.1]}
    s = FracSchedule([0.25, 0.5, 1.0], seed=0)
    play(s, lambda f, n: seq[f][n])
    assert [f for _, f, _ in s.eliminated] == [1.0, 0.5]
    assert s.eliminated[1][2] == pytest.approx(0.2) and s.chosen == 0.25
    assert s.mean_reward(0.25) == pytest.approx(0.225)


def test_schedule_ties_keep_the_larger_frac_and_orders_are_seeded():
    s = FracSchedule([0.125, 0.25, 0.5, 0.75, 1.0], seed=0)
    play(s, lambda f, n: 0.0)
    assert [f for _, f, _ in s.eliminated] == [0.125, 0.25, 0.5, 0.75] and s.chosen == 1.0
    orders = {seed: play(FracSchedule([0.125, 0.25, 0.5, 0.75, 1.0], seed), lambda f, n: f) for seed in range(4)}
    assert orders[1] == play(FracSchedule([0.125, 0.25, 0.5, 0.75, 1.0], 1), lambda f, n: f)   # same seed
    assert len({tuple(o) for o in orders.values()}) > 1                                       # seeds differ
    one = FracSchedule([0.3], seed=0)
    assert one.chosen == 0.3 and not one.exploring


def test_schedule_state_round_trips_mid_round():
    a = FracSchedule([0.125, 0.25, 0.5, 0.75, 1.0], seed=5)
    for x in (0.1, 0.4, 0.2, 0.3, 0.5, 0.0, 0.2):     # a round and two segments of the next
        a.record(x)
    b = FracSchedule([0.125, 0.25, 0.5, 0.75, 1.0], seed=0)
    b.load_state_dict(a.state_dict())
    assert play(a, lambda f, n: f * (n + 1)) == play(b, lambda f, n: f * (n + 1))
    assert a.chosen == b.chosen and a.eliminated == b.eliminated
    with pytest.raises(ValueError, match="same auto_fracs"):
        FracSchedule([0.5, 1.0]).load_state_dict(a.state_dict())


def test_auto_frac_evaluates_once_per_segment_and_rewards_the_relative_drop():
    losses = iter([4.0, 3.0, 2.7, 2.0, 1.9])   # L at the start, then after each segment
    calls = []

    def evaluate():
        calls.append(step)
        return next(losses)

    auto = AutoFrac([0.5, 1.0], every=3, seed=0, holdout=[1, 2])
    fracs = []
    for step in range(20):
        f = auto.before_step(step, evaluate)
        fracs.append(f)
        auto.after_step(f)
    # two candidates: one round of two segments of 3 steps, then the choice: evaluations at 0, 3, 6 only
    assert calls == [0, 3, 6]
    seg = auto.segments
    assert [(x["start_step"], x["end_step"]) for x in seg] == [(0, 3), (3, 6)]
    assert seg[0]["reward"] == pytest.approx((4.0 - 3.0) / 4.0) and seg[1]["reward"] == pytest.approx(0.1)
    first, second = seg[0]["frac"], seg[1]["frac"]
    assert {first, second} == {0.5, 1.0}
    assert fracs == [first] * 3 + [second] * 3 + [first] * 14   # the better one (reward 0.25) stays
    summary = auto.summary()
    assert summary["chosen"] == first and summary["frac_per_step"] == fracs
    assert summary["mean_frac"] == pytest.approx(sum(fracs) / 20)


# --------------------------------------------------------------------------- the engine's knob
def test_set_frac_changes_k_and_is_checked():
    torch.manual_seed(0)
    model = mt.llama(tied=False)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5)
    g, t = mt.make_batch(8, 10, 1), mt.make_batch(2, 10, 2)
    for frac, k in ((0.5, 4), (0.25, 2), (1.0, 8), (0.125, 1)):
        reg.set_frac(frac)
        reg.backward(g, t)
        assert reg.frac == frac and reg.options.frac == frac
        assert {int(m.sum()) for m in reg.last_masks.values()} == {k}, frac
    for bad in (0.0, 1.5, "auto", "x"):
        with pytest.raises(OptionError) as err:
            reg.set_frac(bad)
        assert err.value.option == "frac"
    assert reg.frac == 0.125                           # a refused value changes nothing
    reg.backward(g, t, finalize=False)
    with pytest.raises(RuntimeError, match="middle of an accumulated step"):
        reg.set_frac(0.5)
    reg.detach()


def test_bare_engine_refuses_auto_with_the_way_to_use_it(tmp_path):
    from drpost import DrPostOptions

    model = mt.llama(tied=False)
    for make in (lambda: DataRegularizer(model, frac="auto"), lambda: DrPostOptions(frac="auto"),
                 lambda: DataRegularizer(model, make_args(tmp_path, **AUTO))):   # a trainer's options: no silent frac
        with pytest.raises(OptionError, match=r"trainer-level option.*DrPostArguments\(frac='auto'\).*set_frac"):
            make()
    assert not any(m._forward_hooks for m in model.modules())       # nothing was attached


# --------------------------------------------------------------------------- the trainer
def test_trainer_plays_the_schedule_in_the_engine(tmp_path):
    t, _ = drpost_run(tmp_path, max_steps=12, **AUTO)
    auto = t.auto_frac
    fracs = auto.fracs_per_step
    assert len(fracs) == 12
    logs = train_logs(t)
    assert [r["auto_frac"] for r in logs] == fracs
    # k per layer = floor(4 * frac) of the frac of that very step (batch 4: 1, 2 or 4 samples)
    assert [r["selected_mean"] for r in logs] == [num_selected(4, f) for f in fracs]
    assert all(r["selected_min"] == r["selected_max"] for r in logs)
    # segments of 2 steps; round 0 plays each candidate once, round 1 the two left, then the choice
    seg = auto.segments
    assert [(x["start_step"], x["end_step"]) for x in seg] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert sorted(x["frac"] for x in seg[:3]) == [0.25, 0.5, 1.0]
    for x in seg:
        assert fracs[x["start_step"]:x["end_step"]] == [x["frac"]] * 2
        assert x["reward"] == pytest.approx((x["loss_before"] - x["loss_after"]) / x["loss_before"])
    assert all(a["loss_after"] == b["loss_before"] for a, b in zip(seg, seg[1:]))   # one evaluation per segment
    chosen = auto.schedule.chosen
    assert chosen is not None and fracs[10:] == [chosen, chosen]
    assert [r["auto_candidates"] for r in logs] == [3] * 6 + [2] * 4 + [1] * 2


def test_gradient_accumulation_keeps_one_frac_per_step(tmp_path):
    t, _ = drpost_run(tmp_path, max_steps=8, gradient_accumulation_steps=2, per_device_train_batch_size=2, **AUTO)
    fracs = t.auto_frac.fracs_per_step
    assert len(fracs) == 8 and len(t.auto_frac.segments) == 3      # one entry per optimisation step
    # micro-batches of 2 rows: k = floor(2 * frac) per micro-batch, summed over the step's two micro-batches
    assert [r["selected_mean"] for r in train_logs(t)] == [2 * num_selected(2, f) for f in fracs]


def test_validation_slice_never_enters_the_target_gradient(tmp_path, monkeypatch):
    data = target(16)
    seen = []
    evaluated = []
    original = DrPostTrainer._target_batch_for_step
    validation = DrPostTrainer._validation_loss

    def spy_target(self):
        batch = original(self)
        seen.extend(tuple(r.tolist()) for r in batch["input_ids"])
        return batch

    def spy_validation(self, model):
        evaluated.append(list(self._auto.holdout))
        return validation(self, model)

    monkeypatch.setattr(DrPostTrainer, "_target_batch_for_step", spy_target)
    monkeypatch.setattr(DrPostTrainer, "_validation_loss", spy_validation)
    t, _ = drpost_run(tmp_path, target_dataset=data, max_steps=10, target_batch_size=3, **AUTO)
    held = t.auto_frac.holdout
    assert len(held) == 4 and len(set(held)) == 4
    held_ids = {tuple(data[i]["input_ids"].tolist()) for i in held}
    rest_ids = {tuple(data[i]["input_ids"].tolist()) for i in range(16) if i not in held}
    assert len(held_ids | rest_ids) == 16                  # the rows are distinguishable
    assert len(seen) == 30 and not held_ids & set(seen)   # 10 steps x 3 target rows, none held out
    assert set(seen) == rest_ids                           # the 12 others are all drawn (4 target epochs)
    assert evaluated and all(h == held for h in evaluated)


def test_validation_loss_is_the_token_mean_of_the_slice(tmp_path):
    from drpost.batch import row_losses

    t, model = drpost_run(tmp_path, max_steps=2, **AUTO)
    data = target(16)
    batch = {k: torch.stack([data[i][k] for i in t.auto_frac.holdout]) for k in data[0]}
    with torch.no_grad():
        sums, tokens = row_losses(model, batch, None)
    assert t._validation_loss(t.model) == pytest.approx(float(sums.sum() / tokens.sum()), rel=1e-10)
    assert model.training                                   # evaluation leaves the model in train mode


@pytest.mark.parametrize("at", [3, 4], ids=["mid-segment", "segment-boundary"])
def test_resume_mid_exploration_is_identical(tmp_path, at):
    kw = dict(max_steps=10, save_strategy="steps", save_steps=at, save_total_limit=None, **AUTO)
    full, full_model = drpost_run(tmp_path, "full", **kw)
    ckpt = tmp_path / "full" / f"checkpoint-{at}"
    saved = torch.load(ckpt / "drpost_state.pt", weights_only=True)["auto_frac"]
    assert len(saved["fracs_per_step"]) == at and saved["schedule"]["alive"] == [0.25, 0.5, 1.0]
    resumed, resumed_model = drpost_run(tmp_path, "resumed", resume=str(ckpt), **kw)
    assert resumed.auto_frac.fracs_per_step == full.auto_frac.fracs_per_step
    assert resumed.auto_frac.summary() == full.auto_frac.summary()
    assert_params_close(params_of(resumed_model), params_of(full_model), rtol=0, atol=0)
    assert len(set(full.auto_frac.fracs_per_step)) > 1      # the checkpoint fell inside the exploration


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    drpost_run(tmp_path, "fixed", frac=0.5, max_steps=2, save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError):     # 16 vs 12 target rows for the sampler, or no auto state
        drpost_run(tmp_path, "auto", resume=str(tmp_path / "fixed" / "checkpoint-2"), max_steps=4, **AUTO)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, option, match", [
    (dict(feasible_set="standard"), "frac", "feasible set that has a frac; feasible_set='standard'"),
    (dict(feasible_set="target_only"), "frac", "feasible_set='target_only' has none"),
    (dict(auto_holdout=16), "auto_holdout", r"auto_holdout must be < n_target \(16\)"),
    (dict(auto_fracs=[]), "auto_fracs", "non-empty"),
    (dict(auto_fracs=[0.0, 0.5]), "auto_fracs", r"distinct numbers in \(0, 1\]"),
    (dict(auto_fracs=[0.5, 1.5]), "auto_fracs", r"distinct numbers in \(0, 1\]"),
    (dict(auto_fracs=[0.5, 0.5]), "auto_fracs", "distinct"),
    (dict(auto_every=0), "auto_every", "positive integer"),
    (dict(auto_holdout=0), "auto_holdout", "positive integer"),
])
def test_bad_auto_arguments(tmp_path, kw, option, match):
    with pytest.raises(OptionError, match=match) as err:
        make_args(tmp_path, **{**AUTO, **kw})
    assert err.value.option == option and str(err.value).startswith("DrPostArguments: ")


def test_bad_frac_text(tmp_path):
    with pytest.raises(OptionError, match=r"a number in \(0, 1\] or 'auto', got 'automatic'"):
        make_args(tmp_path, frac="automatic")
    assert make_args(tmp_path, frac="0.25").frac == 0.25 and make_args(tmp_path, frac="AUTO").frac == "auto"


def test_trainer_needs_target_rows_beyond_the_slice(tmp_path):
    with pytest.raises(ValueError, match=r"leaves 2 for the target gradient, fewer than target_batch_size=3"):
        DrPostTrainer(model=mt.llama(tied=False), args=make_args(tmp_path, n_target=6, target_batch_size=3, **AUTO),
                      train_dataset=rows(8, 1), target_dataset=target(6))


def test_trainer_refuses_auto_under_torchrun(tmp_path, monkeypatch):
    args = make_args(tmp_path, **AUTO)
    monkeypatch.setattr(DrPostArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="one process only.*under torchrun give frac a number"):
        DrPostTrainer(model=mt.llama(tied=False), args=args, train_dataset=rows(8, 1), target_dataset=target())


# --------------------------------------------------------------------------- spellings
def test_yaml_cli_and_hf_parser_spellings(tmp_path):
    from transformers import HfArgumentParser

    path = tmp_path / "auto.yaml"
    path.write_text(Path(TINY).read_text().replace("frac: 0.5", "frac: auto\n  auto_fracs: [0.25, 1]\n  "
                                                   "auto_holdout: 2\n  auto_every: 3")
                    .replace("n_target: 4", "n_target: 6"))
    cfg = load_config(path)
    assert config_to_dict(load_config(save_config(cfg, tmp_path / "saved.yaml"))) == config_to_dict(cfg)
    r = cfg.drpost
    assert (r.frac, r.auto_fracs, r.auto_holdout, r.auto_every) == ("auto", [0.25, 1.0], 2, 3)
    values = r.trainer_values()
    assert values["frac"] == "auto" and values["auto_fracs"] == [0.25, 1.0]
    cli = load_config(TINY, ["--drpost.frac", "auto", "--data.n_target", "8", "--drpost.auto_fracs", "0.5,0.75,1"])
    assert cli.drpost.frac == "auto" and cli.drpost.auto_fracs == [0.5, 0.75, 1.0] and cli.drpost.auto_holdout == 4
    assert load_config(TINY, ["--drpost.frac", "0.25"]).drpost.frac == 0.25
    with pytest.raises(ConfigError, match=r"'drpost.auto_holdout' must be < data.n_target \(4\)"):
        load_config(TINY, ["--drpost.frac", "auto"])
    with pytest.raises(ConfigError, match=r"'drpost.target_batch_size' must be <= data.n_target - drpost.auto_holdout"):
        load_config(TINY, ["--drpost.frac", "auto", "--drpost.auto_holdout", "3"])
    with pytest.raises(ConfigError, match=r"'drpost.frac'.*feasible set that has a frac"):
        load_config(TINY, ["--drpost.frac", "auto", "--data.n_target", "8", "--drpost.feasible_set", "standard"])
    with pytest.raises(ConfigError, match=r"'drpost.auto_fracs\[1\]' must be a number"):
        load_config(TINY, ["--drpost.auto_fracs", "0.5,x"])
    with pytest.raises(ConfigError, match=r"sft recipe only"):
        load_config(TINY, ["--drpost.frac", "auto", "--data.n_target", "8", "--recipe", "rl"])

    args = DrPostArguments(output_dir=str(tmp_path / "o"), use_cpu=True, frac="auto")
    assert args.frac == "auto" and args.engine_options().frac in args.auto_fracs
    parser = HfArgumentParser(DrPostArguments)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--frac", "auto", "--auto_fracs", "0.25", "0.5"])
    assert parsed.frac == "auto" and parsed.auto_fracs == [0.25, 0.5]
    (parsed,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--use_cpu", "true",
                                                    "--frac", "0.25"])
    assert parsed.frac == 0.25 and parsed.engine_options().frac == 0.25


# --------------------------------------------------------------------------- recipes
def test_drpost_train_with_frac_auto_records_the_history(tmp_path):
    from drpost.cli import main

    assert main(["train", TINY, "--drpost.frac", "auto", "--data.n_target", "6", "--drpost.auto_holdout", "2",
                 "--drpost.auto_fracs", "0.25,1", "--drpost.auto_every", "1", "--train.steps", "4",
                 "--train.save_steps", "0", "--output_dir", str(tmp_path), "--no-progress"]) == 0
    m = json.loads((tmp_path / "tiny_test" / "metrics.json").read_text())
    auto = m["auto_frac"]
    assert auto["candidates"] == [0.25, 1.0] and len(auto["holdout_rows"]) == 2
    assert len(auto["segments"]) == 2 and auto["chosen"] in (0.25, 1.0)
    fracs = auto["frac_per_step"]
    assert len(fracs) == 4 and fracs[2:] == [auto["chosen"]] * 2
    assert sorted(fracs[:2]) == [0.25, 1.0]
    assert auto["mean_frac"] == pytest.approx(sum(fracs) / 4)
    assert [h["auto_frac"] for h in m["history"]["train"]] == fracs
    # batch 4: k = 1 with 0.25, 4 with 1
    assert [h["selected_mean"] for h in m["history"]["train"]] == [num_selected(4, f) for f in fracs]
    assert m["data"]["target"] == 6


def test_spectrum_grid_point_auto(tmp_path):
    from drpost.recipes.spectrum import format_summary, grid, point_config, run_row, summarise

    cfg = load_config(TINY, ["--spectrum.methods", "standard,layerwise", "--spectrum.seeds", "0",
                             "--spectrum.fracs", "0.5,auto", "--data.n_target", "6", "--drpost.auto_holdout", "2",
                             "--output_dir", str(tmp_path)])
    points = grid(cfg)
    assert [p.name for p in points] == ["standard-seed0", "layerwise-frac0.5-seed0", "layerwise-fracauto-seed0"]
    pc = point_config(cfg, points[2])
    assert (pc.drpost.feasible_set, pc.drpost.frac) == ("layerwise", "auto")
    assert point_config(cfg, points[1]).drpost.frac == 0.5 and point_config(cfg, points[0]).drpost.frac == 1.0
    assert points[2].kept is None
    metrics = {"final": {"test_ppl": 10.0}, "run_dir": "x", "steps": 4, "history": {"train": [], "eval": []},
               "auto_frac": {"mean_frac": 0.625}}
    row = run_row(points[2], metrics)
    assert row["frac"] == "auto" and row["kept"] == 0.625
    assert "| layerwise | auto | 1 |" in format_summary(summarise([row]), [])
    with pytest.raises(ConfigError, match="spectrum.fracs"):
        load_config(TINY, ["--spectrum.fracs", "0.5,automatic"])
