"""LayerGroup.cache_state / load_cache_state: the separate strategy's cached target in today's
checkpoint format (pairwise caches as [(rule index, a, d)], sketch caches keyed by rule index,
dense caches keyed by parameter index), and a round trip through torch.save that continues
training exactly as the original would."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import models_tiny as mt
from drpost import DataRegularizer
from drpost.group import LayerGroup

CASES = [("llama_tied", "pairwise_ghost", "pairwise_ghost"), ("llama_untied_bias", "reduced_ghost", "dense"),
         ("gpt2", "sketch", "sketch"), ("tiny_lm", "direct", "dense")]


def _reg(model, scoring):
    return DataRegularizer(model, feasible_set="layerwise", frac=0.5, scoring=scoring, target_strategy="separate",
                           sketch="gaussian-8x8")


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,scoring,kind", CASES)
def test_round_trip(name, scoring, kind):
    model = mt.BUILDERS[name]()
    general, target = mt.make_batch(6, 10, seed=1), mt.make_batch(3, 10, seed=2)
    twin = copy.deepcopy(model)
    reg = _reg(model, scoring)
    reg.capture_target(target)
    states = {g.name: g.cache_state() for g in reg.layer_groups}
    assert all(s is not None and s["kind"] in (kind, "dense") for s in states.values())
    assert any(s["kind"] == kind for s in states.values())
    for g in reg.layer_groups:
        rep = states[g.name]["repr"]
        if states[g.name]["kind"] == "pairwise_ghost":
            assert all(isinstance(i, int) and isinstance(a, torch.Tensor) for i, a, _ in rep)
        else:
            assert all(isinstance(i, int) for i in rep)
    buf = io.BytesIO()
    torch.save(states, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    other = _reg(twin, scoring)
    for g in other.layer_groups:
        g.load_cache_state(loaded[g.name])
        again = g.cache_state()
        assert same(again, states[g.name])
    # the sketch projections are drawn from the same seeds, so both continue identically
    other.load_state_dict(reg.state_dict())     # the target's token count, loss and age travel with it
    reg.backward(general)
    other.backward(general)
    a, b = _grads(model), _grads(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("scoring", ["pairwise_ghost", "reduced_ghost", "sketch"])
def test_format_matches_the_engine_checkpoint(scoring):
    model = mt.BUILDERS["llama_tied"]()       # no biases: the engine's own state_dict can index it
    reg = _reg(model, scoring)
    reg.capture_target(mt.make_batch(3, 10, seed=2))
    engine = reg.state_dict()["target_caches"]
    mine = {g.name: g.cache_state() for g in reg.layer_groups if g.cache is not None}
    assert same(mine, engine)


def test_empty_and_unknown():
    g = LayerGroup(0)
    assert g.cache_state() is None
    g.load_cache_state(None)
    assert g.cache is None
    with pytest.raises(ValueError, match="unknown cached target kind 'gradient'"):
        g.load_cache_state({"kind": "gradient", "repr": {}})


def test_sketch_caches_from_before_shared_input_sketches_are_captured_again():
    """A checkpoint written before layers fed one input drew one input-side sketch holds target
    sketches projected with other matrices: they are dropped with a warning and the next step
    captures the target again (and then trains as an engine that captured it itself)."""
    model = mt.BUILDERS["llama_tied"]()
    general, target = mt.make_batch(6, 10, seed=1), mt.make_batch(3, 10, seed=2)
    twin = copy.deepcopy(model)
    reg = _reg(model, "sketch")
    reg.capture_target(target)
    state = reg.state_dict()
    assert state.pop("sketch_inputs_shared") is True
    other = _reg(twin, "sketch")
    with pytest.warns(UserWarning, match="predate shared input sketches"):
        other.load_state_dict(state)
    assert all(g.cache is None for g in other.layer_groups)
    with pytest.raises(ValueError, match="target"):
        other.backward(general)                     # the target is due again
    reg.backward(general)
    other.backward(general, target)
    a, b = _grads(model), _grads(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
