"""Sketch scoring: unbiased score estimates, exact gradients given the selection."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import models_tiny as mt
import oracles as O
from conftest import import_engine
from test_engine_oracle import FRAC, get_case


def sketch_run(case, spec, seed, feasible="layerwise", strategy="merged", **kw):
    DataRegularizer = import_engine()
    model = case.fresh()
    reg = DataRegularizer(model, feasible_set=feasible, frac=FRAC, scoring="sketch", sketch=spec, seed=seed,
                          target_strategy=strategy, **kw)
    reg.backward(case.general, case.target)
    scores = {n: v.detach().double().clone() for n, v in reg.last_scores.items()}
    masks = {n: v.detach().clone() for n, v in reg.last_masks.items()}
    backends = dict(reg.layer_backends)
    reg.detach()
    return model, scores, masks, backends


def _projected_layers(case, k):
    """Layers (Linear/Conv1D only) with a side wider than k, so that a k x k sketch is random (the
    input side of a layer with a trainable bias has one more column, the constant 1)."""
    out = []
    for layer in case.oracle.layers:
        if layer.kinds != ["linear"] and layer.kinds != ["conv1d"]:
            continue
        w = [n for n in layer.params if n.endswith("weight")][0]
        shape = case.oracle.G[0][w].shape
        o, i = (shape[0], shape[1]) if layer.kinds == ["linear"] else (shape[1], shape[0])
        i += any(n.endswith("bias") for n in layer.params)
        if o > k or i > k:
            out.append(layer.name)
    return out


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
@pytest.mark.parametrize("model_name,n", [("tiny_lm", 300), ("gpt2", 300), ("llama_untied_bias", 300)])
def test_sketch_scores_are_unbiased(model_name, n, kind):
    """On the Llama, q/k/v and gate/up share their input-side projection: each of those layers stays
    unbiased (its 16 x Vocab lm_head is checked on the other models; 300 runs of a 12 x 12 sketch
    are too few for the power check there)."""
    case = get_case(model_name)
    orc = case.oracle
    k = 12
    names = _projected_layers(case, k)
    assert names, "no layer wide enough to be sketched"
    runs = [sketch_run(case, f"{kind}-{k}x{k}", seed)[1] for seed in range(n)]
    for name in orc.names:
        est = torch.stack([r[name] for r in runs])            # [n, B]
        mean, sd = est.mean(0), est.std(0)
        exact = orc.scores[name]
        scale = float(exact.abs().max())
        if name not in names or (model_name.startswith("llama") and not name.endswith("_proj")):
            continue
        assert float(sd.max()) > 1e-6 * scale, f"{name}: sketched scores do not vary with the seed"
        z = (mean - exact).abs() / (sd / math.sqrt(n) + 1e-12 * scale)
        assert float(z.max()) < 5.0, (f"{name}: mean of {n} sketched scores is {float(z.max()):.1f} standard "
                                      f"errors from the exact score\nmean={mean}\nexact={exact}")
        # the test has power: the standard error is small against the scores themselves
        se = float((sd / math.sqrt(n)).max())
        assert se < 0.25 * scale, f"{name}: standard error {se:.3g} too large for scores of size {scale:.3g}"


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_sketch_is_deterministic_given_seed(kind):
    case = get_case("tiny_lm")
    _, a, ma, _ = sketch_run(case, f"{kind}-6x6", seed=3)
    _, b, mb, _ = sketch_run(case, f"{kind}-6x6", seed=3)
    _, c, _, _ = sketch_run(case, f"{kind}-6x6", seed=4)
    for n in a:
        assert torch.equal(a[n], b[n])
        assert torch.equal(ma[n], mb[n])
    assert any(not torch.allclose(a[n], c[n]) for n in _projected_layers(case, 6))


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
@pytest.mark.parametrize("model_name", ["llama_tied", "llama_untied_bias", "gpt2", "llama_lora", "gpt2_lora",
                                        "tiny_lm"])
def test_sketch_no_wider_than_the_layer_is_exact(model_name, kind):
    """A k x k sketch of a layer whose sides are at most k wide is the identity: the scores are the
    exact scores (to float64 precision) and so is the top-k choice."""
    case = get_case(model_name)
    orc = case.oracle
    assert not _projected_layers(case, 256), "a test model has a layer wider than 256"
    _, scores, masks, _ = sketch_run(case, f"{kind}-256x256", seed=0)
    kk = O.num_selected(orc.B, FRAC)
    for n in orc.names:
        O.assert_close(scores[n], orc.scores[n], f"{kind}-256x256 scores of {n}", 1e-10)
        if O.topk_gap(orc.scores[n], kk) > 1e-8:
            assert torch.equal(masks[n].cpu(), O.naive_topk(orc.scores[n], kk)), n


@functools.lru_cache(maxsize=None)
def wide_case(hidden=512):
    """TinyLM with a hidden width of 512 (fc1: 16 -> 512, fc2: 512 (+ bias) -> 128), float64; the
    embedding is frozen so that fc1 and fc2 are the scored layers, both wider than 64."""
    torch.manual_seed(0)
    model = mt.TinyLM(hidden=hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model.embed.weight[mt.PAD_ID].zero_()
    model = model.double().eval()
    model.embed.weight.requires_grad_(False)
    general, target = mt.make_batch(6, 10, seed=101), mt.make_batch(3, 10, seed=201)
    return model, general, target, O.Oracle(model, general, target)


def wide_scores(spec, seed):
    model, general, target, _ = wide_case()
    reg = import_engine()(model, feasible_set="layerwise", frac=FRAC, scoring="sketch", sketch=spec, seed=seed)
    reg.backward(general, target)
    out = {n: v.detach().double().clone() for n, v in reg.last_scores.items()}
    assert set(reg.layer_backends.values()) == {"sketch"}
    reg.detach()
    for p in model.parameters():
        p.grad = None
    return out


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_sketch_of_a_wide_layer_is_unbiased(kind):
    """A 64 x 64 sketch of 512-wide Linears: the mean over seeds is within a few standard errors of
    the exact scores, and the test has power (the standard error is small against the scores)."""
    orc, n = wide_case()[3], 100
    runs = [wide_scores(f"{kind}-64x64", seed) for seed in range(n)]
    for name in orc.names:
        est = torch.stack([r[name] for r in runs])            # [n, B]
        exact, scale = orc.scores[name], float(orc.scores[name].abs().max())
        mean, se = est.mean(0), est.std(0) / math.sqrt(n)
        assert float(se.min()) > 1e-6 * scale, f"{name}: sketched scores do not vary with the seed"
        z = float(((mean - exact).abs() / se).max())
        assert z < 5.0, f"{name}: mean of {n} sketched scores is {z:.1f} standard errors from exact"
        assert float(se.max()) < 0.25 * scale, f"{name}: standard error too large for scores of size {scale:.3g}"


def test_sketch_error_shrinks_as_k_grows():
    orc, n = wide_case()[3], 10
    rms = []
    for k in (8, 32, 128):
        err = [sum(float(((r[name] - orc.scores[name]) ** 2).mean()) for name in orc.names)
               for r in (wide_scores(f"gaussian-{k}x{k}", seed) for seed in range(n))]
        rms.append(math.sqrt(sum(err) / n))
    assert rms[0] > 1.5 * rms[1] > 2.25 * rms[2], f"rms error of the sketched scores for k = 8, 32, 128: {rms}"


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible", ["layerwise", "global", "rowwise", "filter"])
@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
@pytest.mark.parametrize("model_name", ["llama_untied_bias", "gpt2", "gpt2_lora", "tiny_lm"])
def test_sketch_gradients_exact_given_selection(model_name, kind, feasible, strategy):
    case = get_case(model_name)
    orc = case.oracle
    model, scores, masks, backends = sketch_run(case, f"{kind}-6x6", seed=1, feasible=feasible, strategy=strategy)
    for n in orc.names:
        m = masks[n].cpu().to(torch.bool)
        assert m.shape == ((orc.B, orc.row_scores[n].shape[1]) if feasible == "rowwise" else (orc.B,))
        if feasible in ("layerwise", "global"):
            assert int(m.sum()) == O.num_selected(orc.B, FRAC)
        if feasible == "global":
            assert torch.equal(m, masks[orc.names[0]].cpu())
    O.assert_grads(model, orc.expected_grads({n: masks[n].cpu().to(torch.bool) for n in orc.names}),
                   f"sketch {kind} {feasible}")


@pytest.mark.parametrize("feasible", ["layerwise", "rowwise"])
@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_sketch_merged_equals_separate(kind, feasible):
    case = get_case("gpt2")
    _, a, ma, _ = sketch_run(case, f"{kind}-6x6", seed=2, feasible=feasible, strategy="merged")
    _, b, mb, _ = sketch_run(case, f"{kind}-6x6", seed=2, feasible=feasible, strategy="separate")
    for n in a:
        O.assert_close(a[n], b[n], f"sketch scores {n}", 1e-7)
        assert torch.equal(ma[n], mb[n])


def test_sketch_selection_follows_sketched_scores():
    """Top-k is taken on the sketched scores the engine reports."""
    case = get_case("tiny_lm")
    _, scores, masks, _ = sketch_run(case, "gaussian-6x6", seed=5)
    k = O.num_selected(case.oracle.B, FRAC)
    for n in scores:
        assert torch.equal(masks[n].cpu(), O.naive_topk(scores[n], k)), n


def test_sketch_backend_reported():
    case = get_case("tiny_lm")
    _, _, _, backends = sketch_run(case, "gaussian-6x6", seed=0)
    for n in _projected_layers(case, 6):
        assert backends[n] == "sketch", f"{n}: {backends[n]}"
