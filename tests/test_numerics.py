"""Numerical guards: NaN/inf never reach an optimizer step, errors name the layer and the step, and
ties between scores are broken the same way every time (issue 7, part 2)."""
from __future__ import annotations

import math
import re

import pytest
import torch

import models_tiny as mt
from drpost import DataRegularizer, NonFiniteError
from test_engine_errors import _nan_setup


def _clean(case):
    g, t = case.general.copy(), case.target.copy()
    for b in (g, t):
        b["input_ids"] = b["input_ids"].clamp(max=126)
    return g, t


def test_error_names_the_layer_and_the_step():
    """A weight turns NaN after one good step: the error says which layer and which step."""
    case, model, general, target, _ = _nan_setup("general_row")
    general, target = _clean(case)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, nonfinite="error")
    reg.backward(general, target)
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite .*at step 2 of this DataRegularizer"):
        reg.backward(general, target)
    reg.detach()


def _overflow_model(case):
    """Finite loss and finite scores, but the (unscored) norm weight's gradient overflows to inf:
    the last guard, on the assembled gradients, must catch it."""
    model = case.fresh()
    model.norm.weight.register_hook(lambda g: None if g is None else g * float("inf"))
    return model


def test_gradient_overflow_is_refused_with_the_parameter_name():
    case, *_ = _nan_setup("general_row")
    general, target = _clean(case)
    model = _overflow_model(case)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, nonfinite="error")
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of norm\.weight at step 1"):
        reg.backward(general, target)
    assert all(p.grad is None for p in model.parameters())
    reg.detach()


def test_gradient_overflow_skip_leaves_the_optimizer_idle():
    case, *_ = _nan_setup("general_row")
    general, target = _clean(case)
    model = _overflow_model(case)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg = DataRegularizer(model, feasible_set="global", frac=0.5, nonfinite="skip")
    stats = reg.backward(general, target)
    assert stats.skipped and all(p.grad is None for p in model.parameters())
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not opt.state                       # AdamW never saw a gradient: no moments, no step count
    reg.detach()


def test_huge_but_finite_gradients_are_not_mistaken_for_overflow():
    """The guard looks at max |g|, not at a norm whose square could overflow: a gradient of 1e200
    (float64) or 1e30 (float32) is finite and the step goes through."""
    case, *_ = _nan_setup("general_row")
    general, target = _clean(case)
    model = case.fresh()
    big = 1e200 if model.norm.weight.dtype == torch.float64 else 1e30
    model.norm.weight.register_hook(lambda g: None if g is None else g * big)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, nonfinite="error")
    stats = reg.backward(general, target)
    assert not stats.skipped and bool(torch.isfinite(model.norm.weight.grad).all())
    assert float(model.norm.weight.grad.abs().max()) > big / 1e6
    reg.detach()


def test_meso_never_steps_on_a_skipped_step():
    """MeSO behind the engine: a skipped step leaves weights, moments and step counts untouched."""
    from drpost.optim import MeSO

    case, model, general, target, kw = _nan_setup("general_row")
    clean_g, clean_t = _clean(case)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = MeSO(named, lr=1e-2, k1=2, seed=0)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, nonfinite="skip", **kw)
    reg.backward(clean_g, clean_t)
    opt.step()
    opt.zero_grad()
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    weights = {n: p.detach().clone() for n, p in named}
    assert reg.backward(general, target).skipped            # a NaN row in the general batch
    opt.step()
    for n, p in named:
        assert torch.equal(p, weights[n]), n
    for p, s in opt.state.items():
        for k, v in s.items():
            assert (torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k]), k
    reg.detach()


def test_meso_refuses_a_nonfinite_gradient_before_touching_anything():
    from drpost.optim import MeSO

    model = mt.llama(tied=False).float()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = MeSO(named, lr=1e-2, k1=4, seed=0)
    for _, p in named:
        p.grad = torch.ones_like(p)
    bad_name, bad = named[-1]
    bad.grad[0] = float("inf")
    weights = {n: p.detach().clone() for n, p in named}
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, weights[n]) for n, p in named)
    assert not any("step" in s or "exp_avg" in s for s in opt.state.values())   # no moment was touched


def test_trainer_error_names_the_training_step(tmp_path):
    from test_trainer import _Poison, drpost_run

    model = mt.llama(tied=False)
    with pytest.raises(NonFiniteError, match=r"training step 3 \(global_step 2\): non-finite"):
        drpost_run(tmp_path, model=model, callbacks=[_Poison(model, bad=2)], max_steps=4, nonfinite="error")


# ------------------------------------------------------------------------------------- ties
@pytest.mark.parametrize("feasible_set,scope", [("layerwise", "layer"), ("global", "layer"),
                                                ("filter", "global"), ("greedy", "layer")])
def test_tied_scores_choose_the_lowest_indices_every_time(feasible_set, scope):
    """Identical general rows have bit-identical scores: the choice is the lowest indices, on every
    run and every layer (stable sort / first argmax), never an arbitrary permutation."""
    torch.manual_seed(0)
    row = mt.make_batch(1, 10, seed=3)
    general = {k: v.repeat(6, 1) for k, v in row.items()}
    target = mt.make_batch(2, 10, seed=4)
    picks = []
    for _ in range(2):
        model = mt.llama(tied=False, seed=1)
        reg = DataRegularizer(model, feasible_set=feasible_set, scope=scope, frac=0.5, greedy_lr=1e-3)
        reg.backward(general, target)
        picks.append({k: m.clone() for k, m in reg.last_masks.items()})
        reg.detach()
    assert picks[0].keys() == picks[1].keys() and picks[0]
    for name, mask in picks[0].items():
        assert torch.equal(mask, picks[1][name]), name
        chosen = mask.nonzero().flatten().tolist()
        assert chosen == list(range(len(chosen))), (name, chosen)
        if feasible_set in ("layerwise", "global", "greedy"):
            assert len(chosen) == 3


def test_scores_of_identical_rows_are_bit_identical():
    """The premise of the tie test: the score kernels give identical rows identical scores."""
    row = mt.make_batch(1, 10, seed=3)
    general = {k: v.repeat(4, 1) for k, v in row.items()}
    reg = DataRegularizer(mt.llama(tied=False, seed=1), feasible_set="layerwise", frac=0.5)
    reg.backward(general, mt.make_batch(2, 10, seed=4))
    for name, s in reg.last_scores.items():
        assert bool((s == s[0]).all()) and math.isfinite(float(s[0])), name
    reg.detach()


def test_cli_reports_a_nonfinite_step_in_one_line(tmp_path, capsys):
    """Through `drpost train` (lr 1e30 blows the weights up after step 1): exit code 2 and one line
    naming the training step, no traceback."""
    from pathlib import Path

    from drpost.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml")
    code = main(["train", tiny, "--train.lr", "1e30", "--drpost.nonfinite", "error", "--train.save_steps", "0",
                 "--eval.at_start", "false", "--train.steps", "3", "--output_dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"drpost train: error: training step \d \(global_step \d\): non-finite .* loss", err), err
    assert "Traceback" not in err
