"""Input-side products shared by the layers that project one input (q/k/v, gate/up): pairwise_ghost's
Gram and the sketch back-end's input sketch are reused only for the same tensors, never kept after a
backward, and the scores equal those computed without the reuse (and, for the sketch, the sketched
inner products of the oracle's per-sample gradients)."""
from __future__ import annotations

import pytest
import torch

import oracles as O
from drpost.layers import linear
from drpost.layers.input_products import INPUT_PRODUCTS
from drpost.scoring import sketch as sketch_mod
from test_engine_oracle import get_case, make_reg


def cross(a, t):
    return INPUT_PRODUCTS.get(("gram",), (a, t), lambda: linear.LinearRule._cross(a, t))


def _count_gemms(monkeypatch):
    calls = []
    real = linear.LinearRule._cross

    def counted(t1, t2):
        calls.append((tuple(t1.shape), tuple(t2.shape)))
        return real(t1, t2)
    monkeypatch.setattr(linear.LinearRule, "_cross", staticmethod(counted))
    return calls


def _with_and_without_reuse(case, calls: list, **kw):
    """One layerwise step with the input products shared, one without: ({layer: scores}, number of
    counted products, {name: group}) and ({layer: scores}, number of counted products)."""
    reg = make_reg(case.fresh(), "layerwise", **kw)
    reg.backward(case.general, case.target)
    shared, n_shared = {k: v.detach().double().clone() for k, v in reg.last_scores.items()}, len(calls)
    groups = {g.name: g for g in reg._pipeline.groups}
    reg.detach()
    assert not INPUT_PRODUCTS.entries, "an input product was kept after the backward"
    calls.clear()
    with INPUT_PRODUCTS.disabled():
        reg = make_reg(case.fresh(), "layerwise", **kw)
        reg.backward(case.general, case.target)
    alone, n_alone = {k: v.detach().double() for k, v in reg.last_scores.items()}, len(calls)
    reg.detach()
    return (shared, n_shared, groups), (alone, n_alone)


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("model_name", ["llama_tied", "llama_lora", "gpt2"])
def test_shared_input_gram_gives_the_same_scores(model_name, strategy, monkeypatch):
    case = get_case(model_name)
    (shared, n_shared, _), (alone, n_alone) = _with_and_without_reuse(
        case, _count_gemms(monkeypatch), scoring="pairwise_ghost", strategy=strategy)
    for n in alone:
        assert torch.equal(shared[n], alone[n]), n
    for n in case.oracle.names:
        O.assert_close(shared[n], case.oracle.scores[n], f"scores of {n}", 1e-6)
    if model_name.startswith("llama"):   # q/k/v (LoRA: their lora_A) and gate/up share their input
        assert n_shared < n_alone, (n_shared, n_alone)
    else:                                # GPT-2: c_attn is one fused projection, nothing to share
        assert n_shared == n_alone


def test_reuse_needs_the_same_tensors():
    torch.manual_seed(0)
    a, t = torch.randn(2, 3, 4), torch.randn(1, 3, 4)
    try:
        c = cross(a, t)
        assert cross(a, t) is c
        assert cross(a.view(2, 3, 4), t) is c          # another view of the same memory
        assert cross(a.clone(), t) is not c              # equal values, other memory
        c = cross(a, t)
        a.mul_(2)                                                    # changed in place: recomputed
        c2 = cross(a, t)
        assert c2 is not c and torch.allclose(c2, 2 * c)
        assert cross(a[:1], t) is not c2                 # another shape
        for j in range(INPUT_PRODUCTS.size):                             # the oldest entry is dropped
            cross(torch.randn(2, 3, 4), t)
        assert len(INPUT_PRODUCTS.entries) == INPUT_PRODUCTS.size
        assert cross(a, t) is not c2
    finally:
        INPUT_PRODUCTS.clear()


def test_a_product_of_another_kind_is_not_reused():
    a, t = torch.randn(2, 3, 4), torch.randn(1, 3, 4)
    try:
        c = cross(a, t)
        other = INPUT_PRODUCTS.get(("sketch", 1), (a, t), lambda: torch.zeros(1))
        assert other is not c and INPUT_PRODUCTS.get(("gram",), (a, t), lambda: None) is c
    finally:
        INPUT_PRODUCTS.clear()


def _count_input_sketches(monkeypatch):
    calls = []
    real = sketch_mod.LayerSketch._right

    def counted(self, x):
        calls.append(tuple(x.shape))
        return real(self, x)
    monkeypatch.setattr(sketch_mod.LayerSketch, "_right", counted)
    return calls


def _augmented(g: dict, layer, name: str) -> torch.Tensor:
    """A Linear's per-sample gradient as [O, I (+1 bias column)] in float64."""
    w = g[name + ".weight"].double()
    b = g.get(name + ".bias")
    return torch.cat([w, b.double()[:, None]], 1) if b is not None and name + ".bias" in layer.params else w


def _sketched(g: torch.Tensor, sk) -> torch.Tensor:
    p1 = torch.eye(g.shape[0], dtype=g.dtype) if sk.left_side.identity else sk.left_side.matrix.double()
    p2 = torch.eye(g.shape[1], dtype=g.dtype) if sk.right_side.identity else sk.right_side.matrix.double()
    return p1.t() @ g @ p2


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("model_name,sharing", [
    ("llama_untied_bias", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           ("mlp.gate_proj", "mlp.up_proj")]),
    ("llama_lora", [("self_attn.q_proj.lora_A.default", "self_attn.v_proj.lora_A.default")])])
def test_sharers_draw_one_input_sketch_and_compute_it_once(model_name, sharing, strategy, monkeypatch):
    """Gaussian 6 x 6 sketches of a tiny Llama (widths 16 / 32: every side projected): the layers fed one
    input draw the same P2 (other layers of the same width a different one), x P2 is computed fewer
    times than without the reuse, the scores are equal either way, and equal the sketched inner
    products <P1^T G_i P2, P1^T G_T P2> of the oracle's per-sample gradients (float64)."""
    case = get_case(model_name)
    orc = case.oracle
    (shared, n_shared, groups), (alone, n_alone) = _with_and_without_reuse(
        case, _count_input_sketches(monkeypatch), scoring="sketch", strategy=strategy, sketch="gaussian-6x6")
    assert n_shared < n_alone, (n_shared, n_alone)
    for n in alone:
        assert torch.equal(shared[n], alone[n]), n
    prefix = [n for n in groups if "layers.0." in n][0].split("layers.0.")[0] + "layers.0."

    def sketch_of(suffix):
        g = groups[prefix + suffix]
        return g, next(iter(g.sketches.values()))
    for names in sharing:
        first = sketch_of(names[0])[1].right_side.matrix
        for n in names[1:]:
            assert torch.equal(sketch_of(n)[1].right_side.matrix, first), n
    if model_name == "llama_untied_bias":     # o_proj reads another input of the same width: its own P2
        assert not torch.equal(sketch_of("self_attn.o_proj")[1].right_side.matrix,
                               sketch_of("self_attn.q_proj")[1].right_side.matrix)
    for names in sharing:
        for suffix in names:
            group, sk = sketch_of(suffix)
            layer = orc.by_name[group.name]
            gt = _sketched(_augmented(orc.gT, layer, group.name), sk)
            want = torch.stack([(_sketched(_augmented(g, layer, group.name), sk) * gt).sum() for g in orc.G])
            O.assert_close(shared[group.name], want, f"sketched scores of {group.name}", 1e-9)
