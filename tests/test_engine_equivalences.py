"""Equivalences the method promises (DESIGN.md property 3): special cases are configuration."""
from __future__ import annotations

import copy

import pytest
import torch

import models_tiny as mt
import oracles as O
from conftest import import_engine
from test_engine_oracle import FRAC, get_case

TIGHT = 1e-9   # engine vs engine in float64


def make(model, feasible, **kw):
    DataRegularizer = import_engine()
    kw.setdefault("frac", FRAC)
    return DataRegularizer(model, feasible_set=feasible, **kw)


def run(model, general, target, feasible, **kw):
    reg = make(model, feasible, **kw)
    reg.backward(general, target)
    out = (O.grads_of(model), {n: v.detach().clone() for n, v in reg.last_scores.items()},
           {n: v.detach().clone() for n, v in reg.last_masks.items()})
    reg.detach()
    return out


def same_grads(a: dict, b: dict, what: str, tol: float = TIGHT):
    assert set(a) == set(b)
    for n in a:
        if a[n] is None or b[n] is None:
            assert a[n] is None and b[n] is None or float((a[n] if a[n] is not None else b[n]).abs().max()) == 0, \
                f"{what}: {n}.grad None on one side only"
            continue
        O.assert_close(a[n], b[n], f"{what}: {n}", tol)


# ------------------------------------------------------------------------------------------
# frac = 1 is standard training

@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible,scope", [("layerwise", "layer"), ("global", "layer"), ("rowwise", "layer"),
                                            ("greedy", "layer"), ("greedy", "global"), ("random", "layer"),
                                            ("random", "global")])
@pytest.mark.parametrize("model_name", ["llama_tied", "gpt2", "llama_lora", "tiny_lm"])
def test_frac_one_is_plain_backward(model_name, feasible, scope, strategy):
    case = get_case(model_name)
    model = case.fresh()
    grads, _, masks = run(model, case.general, case.target, feasible, frac=1.0, scope=scope,
                          target_strategy=strategy, scoring="reduced_ghost")
    for n, m in masks.items():
        assert m.all(), f"frac=1: {n} did not keep every sample"
    same_grads(grads, O.plain_grads(case.model, case.general), f"frac=1 {feasible}/{scope}", 1e-6)


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_standard_equals_hf_loss_backward(strategy):
    case = get_case("gpt2")
    model = case.fresh()
    grads, _, _ = run(model, case.general, case.target, "standard", target_strategy=strategy)
    # HF computes its loss in float32, hence the looser tolerance
    same_grads(grads, O.hf_plain_grads(case.fresh(), case.general), "standard vs HF loss.backward()", 1e-5)


# ------------------------------------------------------------------------------------------
# structural equivalences

@pytest.mark.parametrize("backend", ["reduced_ghost", "pairwise_ghost", "direct"])
@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_global_on_single_layer_is_layerwise(backend, strategy):
    model0 = mt.single_layer_llama(seed=9)
    general, target = mt.make_batch(6, 10, seed=31), mt.make_batch(3, 10, seed=32)
    orc = O.Oracle(model0, general, target)
    assert orc.names == ["model.layers.0.mlp.down_proj"] and not orc.rest
    ga, sa, ma = run(copy.deepcopy(model0), general, target, "global", scoring=backend, target_strategy=strategy)
    gb, sb, mb = run(copy.deepcopy(model0), general, target, "layerwise", scoring=backend, target_strategy=strategy)
    name = orc.names[0]
    O.assert_close(sa[name], sb[name], "scores", TIGHT)
    O.assert_close(sa[name], orc.scores[name], "scores vs oracle", 1e-6)
    assert torch.equal(ma[name], mb[name])
    assert torch.equal(mb[name].cpu(), O.naive_topk(orc.scores[name], 3))
    same_grads(ga, gb, "global vs layerwise")
    same_grads(gb, orc.expected_grads({name: mb[name].cpu()}), "layerwise vs oracle", 1e-6)


@pytest.mark.parametrize("backend", ["reduced_ghost", "pairwise_ghost", "direct"])
@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_rowwise_on_one_row_layer_is_layerwise(backend, strategy):
    model0 = mt.single_row_lm(seed=3)
    general, target = mt.make_batch(6, 10, seed=41), mt.make_batch(3, 10, seed=42)
    orc = O.Oracle(model0, general, target)
    assert orc.names == ["proj"]
    ga, sa, ma = run(copy.deepcopy(model0), general, target, "rowwise", scoring=backend, target_strategy=strategy)
    gb, sb, mb = run(copy.deepcopy(model0), general, target, "layerwise", scoring=backend, target_strategy=strategy)
    assert tuple(sa["proj"].shape) == (6, 1) and tuple(ma["proj"].shape) == (6, 1)
    O.assert_close(sa["proj"][:, 0], sb["proj"], "rowwise vs layerwise scores", TIGHT)
    assert torch.equal(ma["proj"][:, 0], mb["proj"])
    same_grads(ga, gb, "rowwise vs layerwise")
    same_grads(gb, orc.expected_grads({"proj": mb["proj"].cpu()}), "layerwise vs oracle", 1e-6)


@pytest.mark.parametrize("feasible,scope", [("layerwise", "layer"), ("global", "layer"), ("filter", "layer"),
                                            ("filter", "global"), ("greedy", "layer"), ("greedy", "global"),
                                            ("rowwise", "layer"), ("random", "layer"), ("random", "global")])
@pytest.mark.parametrize("model_name", ["llama_untied_bias", "gpt2_lora", "tiny_lm"])
def test_merged_equals_separate(model_name, feasible, scope):
    case = get_case(model_name)
    kw = dict(scope=scope, scoring="reduced_ghost", seed=5)
    if feasible == "greedy":
        kw["greedy_lr"] = case.greedy_lr[scope]
    ga, sa, ma = run(case.fresh(), case.general, case.target, feasible, target_strategy="merged", **kw)
    gb, sb, mb = run(case.fresh(), case.general, case.target, feasible, target_strategy="separate", **kw)
    assert set(sa) == set(sb) and set(ma) == set(mb)
    for n in sa:
        O.assert_close(sa[n], sb[n], f"scores {n}", 1e-7)
    for n in ma:
        assert torch.equal(ma[n], mb[n]), f"merged vs separate selection differs in {n}"
    same_grads(ga, gb, f"merged vs separate {feasible}")


@pytest.mark.parametrize("feasible", ["layerwise", "global", "rowwise", "greedy"])
@pytest.mark.parametrize("model_name", ["llama_tied", "gpt2", "gpt2_lora"])
def test_backends_agree(model_name, feasible):
    case = get_case(model_name)
    kw = dict(greedy_lr=case.greedy_lr["layer"]) if feasible == "greedy" else {}
    results = {b: run(case.fresh(), case.general, case.target, feasible, scoring=b, **kw)
               for b in ("reduced_ghost", "pairwise_ghost", "direct", "auto")}
    g0, s0, m0 = results["reduced_ghost"]
    for b, (g, s, m) in results.items():
        for n in s0:
            O.assert_close(s[n], s0[n], f"{b} vs reduced_ghost scores {n}", 1e-7)
            assert torch.equal(m[n], m0[n]), f"{b} vs reduced_ghost selection {n}"
        same_grads(g, g0, f"{b} vs reduced_ghost grads")


# ------------------------------------------------------------------------------------------
# random feasible set: seeded

def test_random_is_seeded():
    case = get_case("llama_tied")
    _, _, a = run(case.fresh(), case.general, case.target, "random", seed=11)
    _, _, b = run(case.fresh(), case.general, case.target, "random", seed=11)
    assert all(torch.equal(a[n], b[n]) for n in a)
    differs = False
    for seed in (12, 13, 14):
        _, _, c = run(case.fresh(), case.general, case.target, "random", seed=seed)
        differs |= any(not torch.equal(a[n], c[n]) for n in a)
    assert differs, "random feasible set ignores the seed"


def test_random_layer_scope_differs_between_layers():
    case = get_case("llama_2layer")
    _, _, m = run(case.fresh(), case.general, case.target, "random", scope="layer", seed=0)
    assert len({tuple(v.tolist()) for v in m.values()}) > 1, "scope=layer drew one subset for all layers"


# ------------------------------------------------------------------------------------------
# gradient accumulation

def _microbatches(case):
    g = case.general
    return mt.slice_batch(g, slice(0, 3)), mt.slice_batch(g, slice(3, 6))


def _accumulate(model, mbs, target, feasible, **kw):
    reg = make(model, feasible, **kw)
    for j, mb in enumerate(mbs):
        reg.backward(mb, target, finalize=(j == len(mbs) - 1))
    grads = O.grads_of(model)
    reg.detach()
    return grads


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible", ["layerwise", "global", "rowwise", "standard"])
@pytest.mark.parametrize("model_name", ["llama_untied_bias", "gpt2", "tiny_lm"])
def test_accumulation_frac_one_is_plain(model_name, feasible, strategy):
    case = get_case(model_name)
    mb1, mb2 = _microbatches(case)
    grads = _accumulate(case.fresh(), [mb1, mb2], case.target, feasible, frac=1.0, target_strategy=strategy)
    same_grads(grads, O.plain_grads(case.model, case.general), f"accumulated {feasible} frac=1", 1e-6)


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("backend", ["reduced_ghost", "pairwise_ghost", "direct"])
@pytest.mark.parametrize("feasible", ["layerwise", "global", "rowwise"])
@pytest.mark.parametrize("model_name", ["llama_untied_bias", "gpt2", "tiny_lm"])
def test_accumulation_selects_per_microbatch(model_name, feasible, backend, strategy):
    """grad = sum_m sum_{i in S_m} G_i / sum_m T_{S_m}, S_m chosen within micro-batch m; non-scored
    params: all rows / all tokens."""
    case = get_case(model_name)
    mbs = list(_microbatches(case))
    orcs = [O.Oracle(case.model, mb, case.target) for mb in mbs]
    k = O.num_selected(3, FRAC)
    rows = feasible == "rowwise"
    grads = _accumulate(case.fresh(), mbs, case.target, feasible, frac=FRAC, target_strategy=strategy,
                        scoring=backend)
    for orc in orcs:
        for n in orc.names:
            s = orc.row_scores[n] if rows else orc.scores[n]
            assert s.dim() == 2 or O.topk_gap(s, k) > 1e-8, "ill-conditioned micro-batch case"
    expected = {}
    for n in orcs[0].params:
        expected[n] = None
    layers = orcs[0].layers
    for layer in layers:
        if feasible == "global":
            masks = [O.naive_topk(o.global_scores(), k) for o in orcs]
        else:
            masks = [O.naive_topk(o.row_scores[layer.name] if rows else o.scores[layer.name], k) for o in orcs]
        for p in layer.params:
            rd = layer.row_dim[p]
            if rows:
                num = sum(torch.einsum("br,br...->r...", m.double(),
                                       torch.stack([g[p].movedim(rd, 0) for g in o.G])) for m, o in zip(masks, orcs))
                tok = sum((m.double() * o.T.view(-1, 1)).sum(0) for m, o in zip(masks, orcs))
                expected[p] = (num / tok.view(-1, *([1] * (num.dim() - 1)))).movedim(0, rd)
            else:
                num = sum(sum(o.G[i][p] for i in range(3) if m[i]) for m, o in zip(masks, orcs))
                tok = sum(float(o.T[m].sum()) for m, o in zip(masks, orcs))
                expected[p] = num / tok
    total = sum(float(o.T.sum()) for o in orcs)
    for p in orcs[0].rest:
        expected[p] = sum(sum(g[p] for g in o.G) for o in orcs) / total
    same_grads(grads, expected, f"accumulated {feasible}", 1e-6)


# ------------------------------------------------------------------------------------------
# attach / detach

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
              "_load_state_dict_pre_hooks")


def _snapshot(model):
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        "hooks": {n: {h: len(getattr(m, h, {}) or {}) for h in HOOK_DICTS} for n, m in model.named_modules()},
        "param_hooks": [(n, len(getattr(p, "_backward_hooks", None) or {}), p.grad is None)
                        for n, p in model.named_parameters(remove_duplicate=False)],
        "forward": [(n, m.__dict__.get("forward")) for n, m in model.named_modules()],
    }


@pytest.mark.parametrize("feasible", ["layerwise", "global", "rowwise", "standard", "target_only", "filter"])
@pytest.mark.parametrize("model_name", ["llama_tied", "gpt2_lora", "tiny_lm"])
def test_detach_restores_model(model_name, feasible):
    case = get_case(model_name)
    model = case.fresh()
    # a frozen parameter must stay frozen, and an unusual flag pattern must survive
    frozen = [p for p in model.parameters() if p.requires_grad][-1]
    frozen.requires_grad_(False)
    before = _snapshot(model)
    with torch.no_grad():
        out_before = O.logits_of(model, case.general).clone()
    reg = make(model, feasible)
    assert type(model) is before["modules"][0][2], "the model object was replaced"
    with torch.no_grad():   # attached: the forward function is unchanged
        O.assert_close(O.logits_of(model, case.general), out_before, "forward while attached", 1e-12)
    reg.backward(case.general, case.target)
    reg.detach()
    after = _snapshot(model)
    assert after["modules"] == before["modules"], "module tree changed"
    assert after["params"] == before["params"], "parameters or requires_grad flags changed"
    assert after["hooks"] == before["hooks"], "hooks left on modules after detach()"
    assert [x[:2] for x in after["param_hooks"]] == [x[:2] for x in before["param_hooks"]], "parameter hooks left"
    assert after["forward"] == before["forward"], "a module's forward was patched and not restored"
    with torch.no_grad():
        assert torch.equal(O.logits_of(model, case.general), out_before), "forward output changed after detach"
    # plain training after detach is plain autograd
    for p in model.parameters():
        p.grad = None
    loss = O.batch_token_mean_loss(model, case.general)
    loss.backward()
    expected = O.plain_grads(model, case.general)
    for n, p in O.trainable(model).items():
        O.assert_close(p.grad, expected[n], f"plain backward after detach {n}", 1e-10)


def test_detach_without_backward():
    case = get_case("gpt2")
    model = case.fresh()
    before = _snapshot(model)
    reg = make(model, "layerwise")
    reg.detach()
    assert _snapshot(model)["hooks"] == before["hooks"]


def test_hooks_do_not_leak_between_regularizers():
    """Attaching, detaching and attaching again gives the same result as the first time."""
    case = get_case("llama_untied_bias")
    model = case.fresh()
    ga, sa, ma = run(model, case.general, case.target, "layerwise")
    for p in model.parameters():
        p.grad = None
    gb, sb, mb = run(model, case.general, case.target, "layerwise")
    same_grads(ga, gb, "second attachment")
