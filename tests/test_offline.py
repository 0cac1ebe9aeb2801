"""Offline (LESS-style) selection: the gradient cosines against a naive float64 oracle, the top-share
rule, bad input, and the recipe path (warm-up, subset, record, resume, spectrum method)."""

import json
import math
from pathlib import Path

import pytest
import torch

import models_tiny as tiny
from drpost.config import load_config
from drpost.offline import gradient_cosines, loss_gradient, top_share
from drpost.recipes.spectrum import grid, point_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")


def _rows(n, seed, min_len=3, max_len=9):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, tiny.VOCAB, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length, (1,), generator=g))   # prompt tokens are not supervised
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "kind": "k%d" % (len(rows) % 2)})
    return rows


def _oracle_grad(model, rows, token_mean):
    """Naive: the cross-entropy written out by hand, all rows in one unpadded loop, float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, tokens = None, 0
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        logits = model(input_ids=ids).logits[0]
        labels = torch.tensor(r["labels"])
        loss = 0.0
        for t in range(1, len(labels)):
            if labels[t] != -100:
                loss = loss - torch.log_softmax(logits[t - 1], -1)[labels[t]]
                tokens += 1
        grads = torch.autograd.grad(loss, params)
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [g / tokens for g in total] if token_mean else list(total)


def _flat(gs):
    return torch.cat([g.reshape(-1) for g in gs])


@pytest.mark.parametrize("lora", [False, True])
def test_cosines_match_the_naive_oracle(lora):
    model = tiny.llama_lora() if lora else tiny.llama(num_layers=2)
    general, target = _rows(7, seed=1), _rows(5, seed=2)
    res = gradient_cosines(model, general, target, pad_id=tiny.PAD_ID)
    params = [p for p in model.parameters() if p.requires_grad]
    assert res.n_params == sum(p.numel() for p in params)
    if lora:
        assert res.n_params < sum(p.numel() for p in model.parameters()) and all(
            "lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    gt = _flat(_oracle_grad(model, target, token_mean=True))
    want = []
    for row in general:
        gi = _flat(_oracle_grad(model, [row], token_mean=False))
        want.append(float(gi @ gt / (gi.norm() * gt.norm())))
    assert torch.allclose(res.scores, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert res.scores.min() < 0 < res.scores.max()   # the test can tell a sign error
    assert all(p.grad is None for p in params)        # scoring leaves .grad alone
    assert res.seconds > 0 and res.seconds_per_example > 0


def test_target_gradient_does_not_depend_on_the_batching():
    model = tiny.llama()
    rows = _rows(9, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    a = _flat(loss_gradient(model, rows, params, tiny.PAD_ID, batch_size=2))
    b = _flat(loss_gradient(model, rows, params, tiny.PAD_ID, batch_size=9))
    assert a.dtype == torch.float64   # float64 parameters keep float64 gradients
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    want = _flat(_oracle_grad(model, rows, token_mean=True))
    assert torch.allclose(a, want, rtol=1e-10, atol=1e-14)


def test_top_share_keeps_the_best_in_pool_order_with_ties_to_the_lower_index():
    s = [0.1, 0.9, -0.5, 0.9, 0.3, float("nan")]
    assert top_share(s, 0.5) == [1, 3, 4]
    assert top_share(s, 0.2) == [1, 3]            # ceil(1.2) = 2
    assert top_share([0.2, 0.2, 0.2], 1 / 3) == [0]  # a tie goes to the lower index
    assert top_share(s, 1.0) == list(range(6))      # NaN ranks last but is kept when everything is
    assert top_share([5.0], 0.01) == [0]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"share of the pool must be in \(0, 1\]"):
            top_share(s, bad)
    with pytest.raises(ValueError, match="no general examples"):
        top_share([], 0.5)


def test_bad_input_is_named():
    model = tiny.llama()
    rows = _rows(3, seed=4)
    empty = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}
    with pytest.raises(ValueError, match="general example 1 has no supervised tokens"):
        gradient_cosines(model, [rows[0], empty], rows, pad_id=0)
    with pytest.raises(ValueError, match="no supervised tokens in the 1 row"):
        gradient_cosines(model, rows, [empty], pad_id=0)
    with pytest.raises(ValueError, match="at least one target example"):
        gradient_cosines(model, rows, [], pad_id=0)
    frozen = tiny.llama()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="has none"):
        gradient_cosines(frozen, rows, rows, pad_id=0)


def test_spectrum_offline_point_is_standard_training_on_a_selected_pool(tmp_path):
    cfg = load_config(TINY, ["--spectrum.methods", "standard,offline,layerwise", "--spectrum.seeds", "0",
                             "--output_dir", str(tmp_path)])
    points = {p.name: p for p in grid(cfg)}
    assert list(points) == ["standard-seed0", "offline-seed0", "layerwise-frac0.5-seed0"]
    off = point_config(cfg, points["offline-seed0"])
    assert (off.drpost.feasible_set, off.drpost.frac, off.data.offline_share) == ("standard", 1.0, 0.25)
    assert point_config(cfg, points["layerwise-frac0.5-seed0"]).data.offline_share == 0.0
    cfg2 = load_config(TINY, ["--spectrum.methods", "offline", "--data.offline_share", "0.5", "--output_dir",
                              str(tmp_path)])
    assert point_config(cfg2, grid(cfg2)[0]).data.offline_share == 0.5


@pytest.mark.parametrize("override, message", [
    (["--data.offline_share", "1.5"], "data.offline_share"),
    (["--data.offline_warmup_steps", "0"], "data.offline_warmup_steps"),
    (["--spectrum.methods", "standard,ofline"], "did you mean 'offline'"),
    (["--data.offline_share", "0.5", "--recipe", "rl"], "applies to the sft recipe only"),
])
def test_bad_offline_config(override, message):
    from drpost.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(TINY, override)


def test_recipe_trains_on_the_subset_records_the_cost_and_resumes(tmp_path):
    from drpost.recipes.sft import run_sft

    over = ["--data.offline_share", "0.5", "--data.offline_warmup_steps", "2", "--drpost.feasible_set", "standard",
            "--train.steps", "2", "--train.eval_every", "0", "--eval.n_test", "2", "--output_dir", str(tmp_path),
            "--run_name", "off"]
    m = run_sft(load_config(TINY, over), progress=False)
    off = m["offline"]
    assert off["pool"] == 24 and off["kept"] == 12 and off["warmup_steps"] == 2
    assert m["data"]["offline_kept"] == 12
    assert off["seconds_scoring"] > 0 and off["cost_in_steps"] > 0
    assert off["score_mean_kept"] >= off["score_mean_pool"]
    saved = json.loads((tmp_path / "off" / "offline.json").read_text())
    assert len(saved["scores"]) == 24 and len(saved["kept_indices"]) == 12
    kept_scores = sorted((saved["scores"][i] for i in saved["kept_indices"]), reverse=True)
    assert kept_scores[-1] >= sorted(saved["scores"], reverse=True)[11] - 1e-12   # the top half
    assert sum(saved["kinds_kept"].values()) == 12
    assert math.isfinite(m["final"]["test_ppl"])
    # resume reads the selection back instead of warming up and scoring again
    m2 = run_sft(load_config(TINY, over + ["--train.steps", "4"]), resume=True, progress=False)
    assert m2["offline"]["kept"] == 12 and m2["offline"]["seconds_scoring"] == off["seconds_scoring"]
