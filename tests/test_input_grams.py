"""The input-side Gram shared by the layers that project one input (q/k/v, gate/up): reused only for
the same tensors, never kept after a backward, and the scores equal those computed without it."""
from __future__ import annotations

import pytest
import torch

import oracles as O
from drpost.layers import linear
from drpost.layers.linear import INPUT_GRAMS
from test_engine_oracle import get_case, make_reg


def _count_gemms(monkeypatch):
    calls = []
    real = linear.LinearRule._cross

    def counted(t1, t2):
        calls.append((tuple(t1.shape), tuple(t2.shape)))
        return real(t1, t2)
    monkeypatch.setattr(linear.LinearRule, "_cross", staticmethod(counted))
    return calls


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("model_name", ["llama_tied", "llama_lora", "gpt2"])
def test_shared_input_gram_gives_the_same_scores(model_name, strategy, monkeypatch):
    case = get_case(model_name)
    kw = dict(scoring="pairwise_ghost", strategy=strategy)
    calls = _count_gemms(monkeypatch)
    reg = make_reg(case.fresh(), "layerwise", **kw)
    reg.backward(case.general, case.target)
    shared, n_shared = {k: v.clone() for k, v in reg.last_scores.items()}, len(calls)
    reg.detach()
    assert not INPUT_GRAMS.entries, "an input Gram was kept after the backward"
    calls.clear()
    with INPUT_GRAMS.disabled():
        reg = make_reg(case.fresh(), "layerwise", **kw)
        reg.backward(case.general, case.target)
    alone, n_alone = reg.last_scores, len(calls)
    reg.detach()
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
        c = INPUT_GRAMS.cross(a, t)
        assert INPUT_GRAMS.cross(a, t) is c
        assert INPUT_GRAMS.cross(a.view(2, 3, 4), t) is c          # another view of the same memory
        assert INPUT_GRAMS.cross(a.clone(), t) is not c              # equal values, other memory
        c = INPUT_GRAMS.cross(a, t)
        a.mul_(2)                                                    # changed in place: recomputed
        c2 = INPUT_GRAMS.cross(a, t)
        assert c2 is not c and torch.allclose(c2, 2 * c)
        assert INPUT_GRAMS.cross(a[:1], t) is not c2                 # another shape
        for j in range(INPUT_GRAMS.size):                             # the oldest entry is dropped
            INPUT_GRAMS.cross(torch.randn(2, 3, 4), t)
        assert len(INPUT_GRAMS.entries) == INPUT_GRAMS.size
        assert INPUT_GRAMS.cross(a, t) is not c2
    finally:
        INPUT_GRAMS.clear()
