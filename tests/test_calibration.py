"""scoring='auto' by measurement (drpost.scoring.calibration): the fastest measured exact back-end
wins, the choice and its reason are reported per layer, results are cached per machine and shape,
the separate strategy only considers back-ends that read its cached target, and the gradients are
those of any exact back-end (float64, against the reduced_ghost run)."""
import json
import os

import models_tiny as mt
import pytest
import torch

from drpost import DataRegularizer
from drpost.scoring import calibration


@pytest.fixture
def fake_timings(monkeypatch, tmp_path):
    """Timings chosen by the test: {back-end: seconds}; counts how many kernels were timed."""
    monkeypatch.setenv("DRPOST_CALIBRATION_CACHE", str(tmp_path / "calibration.json"))
    calibration.clear_memory()
    state = {"seconds": {}, "timed": 0}

    def kernels(rule, name, gen, tgt, k, share):
        def run():
            pass
        run.backend = name
        return run, None

    def median(fn, device):
        state["timed"] += 1
        seconds = state["seconds"]
        return seconds.get(fn.backend, seconds.get("pairwise_ghost"))   # REUSED: as pairwise unless set

    monkeypatch.setattr(calibration, "_kernels", kernels)
    monkeypatch.setattr(calibration, "_median_seconds", median)
    yield state
    calibration.clear_memory()


def _step(model, **kw):
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, **kw)
    reg.backward(mt.make_batch(6, 10, seed=1), mt.make_batch(2, 10, seed=2))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    reg.detach()
    return reg, grads


@pytest.mark.parametrize("fastest", ["direct", "pairwise_ghost", "reduced_ghost"])
def test_the_fastest_measured_backend_is_chosen_and_exact(fake_timings, fastest):
    fake_timings["seconds"] = {"reduced_ghost": 2e-3, "pairwise_ghost": 3e-3, "direct": 4e-3} | {fastest: 1e-3}
    reg, grads = _step(mt.llama(tied=False))
    linear = [n for n in reg.layer_backends if "proj" in n or n == "lm_head"]
    assert linear and all(reg.layer_backends[n] == fastest for n in linear)
    assert all(reg.layer_backend_reasons[n].startswith(f"measured fastest: {fastest} 1 ms") for n in linear)
    # exact back-ends agree: the update equals the one scored with reduced_ghost everywhere
    _, ref = _step(mt.llama(tied=False), scoring="reduced_ghost")
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-12)


def test_measurements_are_cached_per_shape_in_memory_and_on_disk(fake_timings):
    fake_timings["seconds"] = {"reduced_ghost": 1e-3, "pairwise_ghost": 3e-3, "direct": 2e-3}
    _step(mt.llama(tied=False))
    timed = fake_timings["timed"]
    shapes = len(json.loads(open(os.environ["DRPOST_CALIBRATION_CACHE"]).read()))
    assert timed == 4 * shapes and 0 < shapes < 8   # 3 back-ends + pairwise with its input Gram reused, per shape
    _step(mt.llama(tied=False))
    assert fake_timings["timed"] == timed            # in memory
    calibration.clear_memory()
    fake_timings["seconds"] = {"reduced_ghost": 9.0, "pairwise_ghost": 9.0, "direct": 9.0}
    reg, _ = _step(mt.llama(tied=False))
    assert fake_timings["timed"] == timed            # from the file: a resumed run chooses as the first did
    assert set(reg.layer_backends.values()) <= {"reduced_ghost"}


def test_separate_strategy_only_considers_backends_that_read_the_cached_target(fake_timings):
    fake_timings["seconds"] = {"reduced_ghost": 2e-3, "pairwise_ghost": 1e-4, "direct": 1e-3}
    reg, _ = _step(mt.llama(tied=False), target_strategy="separate")
    linear = [n for n in reg.layer_backends if "proj" in n]
    assert all(reg.layer_backends[n] == "direct" for n in linear)
    assert all("pairwise_ghost: target kept dense" in reg.layer_backend_reasons[n] for n in linear)


def test_model_mode_and_custom_rules_keep_the_modelled_choice(fake_timings):
    fake_timings["seconds"] = {"reduced_ghost": 1.0, "pairwise_ghost": 1.0, "direct": 1e-6}
    reg, _ = _step(mt.llama(tied=False), auto_calibration="model")
    assert fake_timings["timed"] == 0
    assert all(r.startswith("modelled cheapest") or "only" in r or "several calls" in r
               for r in reg.layer_backend_reasons.values())


def test_real_measurement_runs_the_rules_kernels(tmp_path, monkeypatch):
    """Without fakes: every candidate is timed on factors of the layer's shape, and the cache file holds it."""
    monkeypatch.setenv("DRPOST_CALIBRATION_CACHE", str(tmp_path / "c.json"))
    calibration.clear_memory()
    reg, _ = _step(mt.llama(tied=False))
    data = json.loads((tmp_path / "c.json").read_text())
    assert data and all(set(v) == {"reduced_ghost", "pairwise_ghost", "direct", calibration.REUSED}
                        and min(v.values()) > 0
                        for v in data.values())
    for name, backend in reg.layer_backends.items():
        reason = reg.layer_backend_reasons[name]
        if reason.startswith("measured fastest:"):
            assert reason.split(": ")[1].startswith(backend)
    calibration.clear_memory()


def test_layers_fed_one_input_share_its_gram_in_the_measured_cost(fake_timings):
    """q/k/v read one tensor, gate/up another: pairwise_ghost computes its input-side Gram once between
    them (InputGrams), so auto charges each of n sharers the reused time plus 1/n of the Gram. Here
    pairwise alone (3 ms) loses to direct (2 ms) but with the Gram shared wins for q/k/v
    (1 + 2/3 ms) and gate/up (1 + 2/2 = 2 ms: a tie goes to neither; direct is listed first) while
    o/down (one reader) keep direct; the update stays exact."""
    fake_timings["seconds"] = {"reduced_ghost": 5e-3, "pairwise_ghost": 3e-3, "direct": 2e-3 + 1e-6,
                               calibration.REUSED: 1e-3}
    reg, grads = _step(mt.llama(tied=False))
    groups = {g.name: g for g in reg._pipeline.groups}
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert groups[attn + "q_proj"].input_sharers == {attn + "q_proj", attn + "k_proj", attn + "v_proj"}
    assert groups[mlp + "up_proj"].input_sharers == {mlp + "gate_proj", mlp + "up_proj"}
    assert len(groups[attn + "o_proj"].input_sharers) == 1 and len(groups[mlp + "down_proj"].input_sharers) == 1
    b = reg.layer_backends
    assert b[attn + "q_proj"] == b[attn + "k_proj"] == b[attn + "v_proj"] == "pairwise_ghost"
    assert b[mlp + "gate_proj"] == b[mlp + "up_proj"] == "pairwise_ghost"
    assert b[attn + "o_proj"] == b[mlp + "down_proj"] == "direct"
    assert "input Gram shared by 3 layers" in reg.layer_backend_reasons[attn + "k_proj"]
    _, ref = _step(mt.llama(tied=False), scoring="reduced_ghost")
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-12)


def test_bad_option_value():
    from drpost.engine.options import OptionError

    with pytest.raises(OptionError, match="unknown auto_calibration 'fast'; choose one of measure, model"):
        DataRegularizer(mt.llama(), auto_calibration="fast")


def test_separate_auto_caches_the_target_as_factors_where_they_are_smaller():
    """auto + separate: a Linear whose target factors (V S (I + O) values) are no larger than its dense
    gradient (O I) caches the factors and scores with pairwise_ghost; the others stay dense. The update
    equals reduced_ghost's (float64), across a refresh, a chunked capture and a checkpoint round trip."""
    torch.manual_seed(0)
    general = [mt.make_batch(6, 10, seed=s) for s in range(3)]
    target = mt.make_batch(1, 10, seed=9, min_len=10)   # V S = 10: MLP (16x32) and lm_head (16xVOCAB) fit
    runs = {}
    for scoring in ("auto", "reduced_ghost"):
        model = mt.llama(tied=False)
        reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, target_strategy="separate",
                              refresh_every=2, scoring=scoring)
        grads = []
        for i, g in enumerate(general):
            if i == 1:   # a checkpoint round trip of the cached target
                state = reg.state_dict()
                reg.load_state_dict(state)
            model.zero_grad(set_to_none=True)
            reg.backward(g, target)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        runs[scoring] = (reg, grads)
    reg, grads = runs["auto"]
    kinds = {g.name: g.cache["kind"] for g in reg._pipeline.groups if g.cache is not None}
    assert kinds["lm_head"] == "pairwise_ghost" and kinds["model.layers.0.mlp.up_proj"] == "pairwise_ghost"
    assert kinds["model.layers.0.self_attn.q_proj"] == "dense"     # 16x16: 10 * 32 > 256
    assert reg.layer_backends["lm_head"] == "pairwise_ghost"
    for got, ref in zip(grads, runs["reduced_ghost"][1]):
        for n, g in ref.items():
            torch.testing.assert_close(got[n], g, rtol=1e-9, atol=1e-12)
    # a capture in chunks extends the form its first chunk chose (never replaces it)
    two = mt.make_batch(2, 5, seed=3, min_len=5)
    reg.capture_target(two, chunk_size=1)
    ref = DataRegularizer(mt.llama(tied=False), feasible_set="layerwise", frac=0.5, target_strategy="separate",
                          scoring="auto")
    ref.capture_target(two)
    for a, b in zip(reg._pipeline.groups, ref._pipeline.groups):
        assert a.cache["kind"] == b.cache["kind"], a.name


@pytest.mark.parametrize("scoring", ["auto", "sketch"])
def test_separate_strategy_caches_a_tied_weights_target_as_factors(scoring):
    """auto or sketch + separate on a tied embedding / lm_head: the target is cached as the tied weight's
    factors where they are smaller than its dense [Vocab, D] target, and scored with the four ghost cross
    terms (not the dense reduced_ghost: 6-8x the scoring time on SmolLM2); the update equals
    reduced_ghost's (float64; with sketch, the tied weight's, which is scored exactly), across a refresh
    and a checkpoint round trip of the cached factors."""
    general = [mt.make_batch(6, 10, seed=s) for s in range(3)]
    target = mt.make_batch(1, 10, seed=9, min_len=10)   # V S (Vocab + 2 D) = 10 * 160 <= 128 * 16
    runs = {}
    for name in (scoring, "reduced_ghost"):
        model = mt.llama(tied=True)
        reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, target_strategy="separate",
                              refresh_every=2, scoring=name)
        grads = []
        for i, g in enumerate(general):
            if i == 1:
                reg.load_state_dict(reg.state_dict())
            model.zero_grad(set_to_none=True)
            reg.backward(g, target)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        runs[name] = (reg, grads)
    reg = runs[scoring][0]
    tied = next(g for g in reg._pipeline.groups if len(g.rules) > 1)
    assert tied.cache["kind"] == "pairwise_ghost"
    backends = {n: b for n, b in reg.layer_backends.items() if "embed" in n or "lm_head" in n}
    assert set(backends.values()) == {"pairwise_ghost"}, (backends, reg.layer_backend_reasons)
    assert any("factors" in why for n, why in reg.layer_backend_reasons.items() if n in backends)
    checked = {id(p) for p in tied.params} if scoring == "sketch" else None
    names = [n for n, p in reg.model.named_parameters() if checked is None or id(p) in checked]
    for got, ref in zip(runs[scoring][1], runs["reduced_ghost"][1]):
        assert set(got) == set(ref) and names
        for n in names:
            g = ref[n]
            torch.testing.assert_close(got[n], g, rtol=1e-9, atol=1e-12)
    # too many target tokens for the factors to be smaller: the dense target, as before
    from drpost.layers import tied as tied_rules

    assert tied_rules.factors_fit(tied.rules, 1, 10) and not tied_rules.factors_fit(tied.rules, 2, 10)
