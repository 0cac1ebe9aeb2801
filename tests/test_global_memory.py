"""``global_memory='recompute'``: global-scope sets keep only the scores through the backward and
assemble the chosen samples in a second backward over the same graph. It must give exactly the
update of ``'retain'`` (one backward, every layer's factors kept), which the oracle tests pin."""
from __future__ import annotations

import pytest
import torch

import models_tiny as mt
import oracles as O
from conftest import import_engine
from test_checkpointing import assert_same, batches, custom_lm, hf_checkpointing, hf_llama, train
from test_engine_equivalences import run, same_grads
from test_engine_errors import _nan_setup
from test_engine_oracle import expected_grads, expected_masks, get_case, make_reg

GLOBAL_SETS = [("global", "layer"), ("filter", "global"), ("greedy", "global"), ("random", "global")]
MODELS = ["llama_tied", "llama_untied_bias", "llama_2layer", "gpt2", "llama_lora", "gpt2_lora", "tiny_lm"]


def _kw(case, feasible, scope):
    kw = dict(scope=scope)
    if feasible == "greedy":
        kw["greedy_lr"] = case.greedy_lr[scope]
    return kw


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible,scope", GLOBAL_SETS)
@pytest.mark.parametrize("model_name", MODELS)
def test_recompute_is_retain(model_name, feasible, scope, strategy):
    case = get_case(model_name)
    kw = dict(_kw(case, feasible, scope), target_strategy=strategy)
    ref_grads, ref_scores, ref_masks = run(case.fresh(), case.general, case.target, feasible, **kw)
    grads, scores, masks = run(case.fresh(), case.general, case.target, feasible, global_memory="recompute", **kw)
    same_grads(grads, ref_grads, f"{model_name} {feasible}/{scope}/{strategy} recompute vs retain")
    assert scores.keys() == ref_scores.keys()
    for n in ref_scores:
        O.assert_close(scores[n], ref_scores[n], f"scores of {n}", 1e-9)
        assert torch.equal(masks[n], ref_masks[n]), f"mask of {n}"


@pytest.mark.parametrize("backend", ["reduced_ghost", "pairwise_ghost", "direct", "sketch", "auto"])
@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_every_backend(backend, strategy):
    case = get_case("llama_untied_bias")
    kw = dict(scoring=backend, target_strategy=strategy)
    ref = run(case.fresh(), case.general, case.target, "global", **kw)
    got = run(case.fresh(), case.general, case.target, "global", global_memory="recompute", **kw)
    same_grads(got[0], ref[0], f"global/{backend}/{strategy}")
    for n in ref[2]:
        assert torch.equal(got[2][n], ref[2][n])


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible,scope", [("global", "layer"), ("filter", "global")])
@pytest.mark.parametrize("model_name", ["llama_tied", "gpt2_lora"])
def test_against_the_oracle(model_name, feasible, scope, strategy):
    """The naive per-sample oracle: the global subset of its scores, and that subset's gradient."""
    case = get_case(model_name)
    model = case.fresh()
    reg = make_reg(model, feasible, scope, "auto", strategy, case=case, global_memory="recompute")
    reg.backward(case.general, case.target)
    masks = expected_masks(case, reg, feasible, scope)
    for n in case.oracle.names:
        assert torch.equal(reg.last_masks[n].cpu(), masks[n]), n
    O.assert_grads(model, expected_grads(case, feasible, masks), f"{model_name}/{feasible}/recompute")
    reg.detach()


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_frac_one_is_a_plain_step(strategy):
    case = get_case("llama_tied")
    grads, _, masks = run(case.fresh(), case.general, case.target, "global", frac=1.0, target_strategy=strategy,
                          global_memory="recompute")
    assert all(m.all() for m in masks.values())
    same_grads(grads, O.plain_grads(case.model, case.general), f"frac=1 recompute/{strategy}", 1e-6)


@pytest.mark.parametrize("fset,strategy,extra", [("global", "merged", {}), ("global", "separate", {}),
                                                 ("filter", "merged", {"scope": "global"})])
def test_accumulated_steps(fset, strategy, extra):
    """Several micro-batches per step and several SGD steps: the same .grad, masks and back-ends."""
    general, target = batches(micro=2)
    kw = dict(feasible_set=fset, target_strategy=strategy, **extra)
    ref = train(hf_llama(), general, target, **kw)
    assert_same(train(hf_llama(), general, target, global_memory="recompute", **kw), ref,
                f"accumulated recompute {fset}/{strategy}")


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_with_activation_checkpointing(strategy, reentrant):
    """The second backward recomputes the checkpointed blocks once more: still the same update."""
    general, target = batches()
    kw = dict(feasible_set="global", target_strategy=strategy)
    ref = train(hf_llama(), general, target, **kw)
    model = hf_llama()
    hf_checkpointing(model, reentrant)
    assert_same(train(model, general, target, global_memory="recompute", **kw), ref,
                f"checkpointed recompute {strategy}/{reentrant}")
    assert_same(train(custom_lm(reentrant), general, target, global_memory="recompute", **kw),
                train(custom_lm(None), general, target, **kw), f"custom block recompute {strategy}/{reentrant}")


def test_recompute_retains_scores_only_and_runs_two_backwards():
    case = get_case("llama_tied")
    reg = make_reg(case.fresh(), "global", strategy="merged", global_memory="recompute")
    pipe = reg._pipeline
    seen, passes = [], []
    real_finish, real_complete = pipe.finish_global, pipe._complete

    def finish():
        seen.extend(pipe.step.retained)
        real_finish()

    def complete(group):
        passes.append(pipe.step.second_pass)
        real_complete(group)
    pipe.finish_global, pipe._complete = finish, complete
    reg.backward(case.general, case.target)
    assert seen and all(parts is None and per_sample is None for _, parts, _, _, per_sample in seen)
    n = len(pipe.groups)
    assert passes.count(False) == n and passes.count(True) == n, passes
    assert pipe.step.global_choice is None and not pipe.step.second_pass


def test_layer_scope_ignores_the_option():
    """A per-layer set has nothing to recompute: one backward, the same update, and a warning that the
    option does nothing here."""
    case = get_case("gpt2")
    ref = run(case.fresh(), case.general, case.target, "layerwise")
    with pytest.warns(UserWarning, match="global_memory='recompute' has no effect with feasible_set='layerwise'"):
        reg = make_reg(case.fresh(), "layerwise", global_memory="recompute")
    assert not reg._pipeline.recomputes_global
    reg.detach()
    with pytest.warns(UserWarning, match="has no effect"):
        got = run(case.fresh(), case.general, case.target, "layerwise", global_memory="recompute")
    same_grads(got[0], ref[0], "layerwise with global_memory=recompute")


@pytest.mark.parametrize("source", ["general_row", "weights"])
def test_nonfinite_skip(source):
    case, model, general, target, kw = _nan_setup(source)
    DataRegularizer = import_engine()
    reg = DataRegularizer(model, feasible_set="global", frac=0.5, nonfinite="skip", global_memory="recompute", **kw)
    assert reg.backward(general, target).to_dict()["skipped"]
    assert all(p.grad is None for p in model.parameters())
    step = reg._pipeline.step
    assert step.global_choice is None and not step.second_pass


def test_bad_value_is_refused():
    DataRegularizer = import_engine()
    with pytest.raises(ValueError, match="global_memory.*retain, recompute"):
        DataRegularizer(mt.tiny_lm(), feasible_set="global", global_memory="twice")


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_retain_releases_each_groups_factors_once_assembled(strategy, monkeypatch):
    """``global_memory='retain'`` keeps every layer's factors through the backward, but frees each
    group's once its chosen samples are assembled: the peak is the retained factors plus one group's
    gradient, not plus all of them (one-pass global 1.17 -> 1.02 of a plain step's live memory on the
    real model). Weak references to the groups' output-gradient factors tell which are still held."""
    import weakref

    from drpost.group import LayerGroup

    held: list = []
    alive_at_call: list[int] = []
    accumulate = LayerGroup.accumulate

    def spy(self, parts, *args, **kwargs):
        alive_at_call.append(sum(r() is not None for r in held))
        held.extend(weakref.ref(gen.d) for _, gen, _ in parts)
        return accumulate(self, parts, *args, **kwargs)

    monkeypatch.setattr(LayerGroup, "accumulate", spy)
    case = get_case("llama_2layer")
    model = case.fresh()
    reg = make_reg(model, "global", "layer", "auto", strategy, case=case)
    reg.backward(case.general, case.target)
    assert len(alive_at_call) >= 4, alive_at_call
    assert alive_at_call == [0] * len(alive_at_call), (
        f"factors of groups already assembled still held at each later assembly: {alive_at_call}")
    O.assert_grads(model, expected_grads(case, "global", expected_masks(case, reg, "global", "layer")),
                   f"global/retain/{strategy}")
    reg.detach()


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible,scope", [("global", "layer"), ("filter", "global")])
def test_retained_factors_build_no_graph(feasible, scope, strategy):
    """Factors kept past the backward (global sets assemble after it, with grad mode back on) are
    detached: the chosen gradients carry no autograd graph (which would hold every factor alive)."""
    case = get_case("llama_2layer")
    model = case.fresh()
    reg = make_reg(model, feasible, scope, "auto", strategy, case=case)
    reg.backward(case.general, case.target)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.grad_fn is None and not p.grad.requires_grad, f"{n}.grad carries a graph"
    reg.detach()
