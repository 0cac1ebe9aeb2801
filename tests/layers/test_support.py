"""Skipping the exactly-zero rows of a vocabulary-wide delta (drpost.layers.support).

The Linear rule finds the rows of its output gradient that are all zero (positions without a
supervised label, padding) and computes the input gradient, sketches, cross products and the chosen
weight gradient on the other rows only. Checked three ways: the run search itself; every rule
method against the same method without the support, in float64; and the engine against the
per-sample oracle with the search switched on for every Linear layer of the tiny models (their
vocabulary is below the default width of 8192), where padding also gives the inner layers zero rows.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models_tiny as mt
import oracles as O
from drpost import DataRegularizer
from drpost.layers import Factors, LinearRule
from drpost.layers.support import MAX_RUNS, intersect, nonzero_runs, slice_runs
from drpost.scoring.sketch import LayerSketch
from test_engine_oracle import check_scores, expected_grads, expected_masks, get_case, make_reg

D, VOCAB = 6, 9000      # VOCAB >= LinearRule.support_min_width


# ------------------------------------------------------------------------------------------
# the run search

def test_nonzero_runs_finds_the_rows_that_are_not_all_zero():
    d = torch.randn(10, 7, dtype=torch.float64)
    d[0:3] = 0
    d[5] = 0
    d[9] = 0
    d[6, 0] = 0                     # a zero first entry, but not a zero row: kept
    assert nonzero_runs(d) == [(3, 5), (6, 9)]


def test_nonzero_runs_keeps_nan_and_inf_rows():
    d = torch.zeros(4, 5)
    d[1, 3] = float("nan")
    d[2, 4] = float("inf")
    assert nonzero_runs(d) == [(1, 3)]


def test_nonzero_runs_is_none_when_nothing_can_be_skipped():
    assert nonzero_runs(torch.randn(6, 4)) is None                      # no zero first entry
    d = torch.randn(6, 4)
    d[:, 0] = 0
    assert nonzero_runs(d) is None                                      # zero first entries, no zero row
    d = torch.randn(4 * MAX_RUNS, 3)
    d[::2] = 0
    assert nonzero_runs(d) is None                                      # too many runs to pay off


def test_nonzero_runs_of_an_all_zero_tensor_is_empty():
    assert nonzero_runs(torch.zeros(5, 3)) == []


def test_many_scattered_candidates_are_checked_in_one_pass():
    d = torch.randn(4 * MAX_RUNS, 3)
    d[::2, 0] = 0                  # 2 * MAX_RUNS candidate runs, one real zero row
    d[10] = 0
    assert nonzero_runs(d) == [(0, 10), (11, 4 * MAX_RUNS)]


def test_slice_and_intersect():
    runs = [(2, 5), (7, 12)]
    assert slice_runs(runs, 4, 10) == [(0, 1), (3, 6)]
    assert slice_runs(runs, 12, 20) == []
    assert slice_runs(None, 0, 3) is None
    assert intersect([(0, 6), (8, 9)], runs) == [(2, 5), (8, 9)]
    assert intersect([(0, 6)], None) == [(0, 6)]


# ------------------------------------------------------------------------------------------
# every rule method, with and without the support

def _factors(n: int, s: int, seed: int, zero_rows) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, s, D, generator=g, dtype=torch.float64)
    d = torch.randn(n, s, VOCAB, generator=g, dtype=torch.float64)
    flat = d.view(-1, VOCAB)
    for r in zero_rows:
        flat[r] = 0
    return x, d


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_linear_rule_methods_agree_with_and_without_the_support(bias, transposed):
    torch.manual_seed(0)
    if transposed:
        from transformers.pytorch_utils import Conv1D
        module = Conv1D(VOCAB, D).double()
        if not bias:
            module.bias.requires_grad_(False)
        rule = LinearRule(module, transposed=True)
    else:
        module = nn.Linear(D, VOCAB, bias=bias).double()
        rule = LinearRule(module)
    n, s = 4, 5
    x, d = _factors(n, s, 1, zero_rows=[0, 1, 2, 7, 8, 13, 14, 15, 16, 17, 18, 19])   # sample 3 all zero
    xt, dt = _factors(2, s, 2, zero_rows=[0, 1, 9])

    with torch.no_grad():           # as inside a backward
        gx, f = rule.tap_backward(x, d, True)
        _, t = rule.tap_backward(xt, dt, False)
    assert f.support == [(3, 7), (9, 13)]
    torch.testing.assert_close(gx, rule.input_grad(x, d), rtol=1e-12, atol=1e-12)
    assert t.support == [(2, 9)]
    plain, plain_t = Factors(f.a, f.d), Factors(t.a, t.d)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    close(rule.pairwise_scores(f, t, False), rule.pairwise_scores(plain, plain_t, False))
    close(rule.gram(f), rule.gram(plain))
    dense = rule.target_dense(t)
    for p, g in rule.target_dense(plain_t).items():
        close(dense[p], g)
    close(rule.dense_scores(f, dense, False), rule.dense_scores(plain, dense, False))
    proj = LayerSketch("gaussian", 8, 4, *rule.sketch_dims(), seed=3, device="cpu", dtype=torch.float64)
    close(rule.sketch(f, proj, False), rule.sketch(plain, proj, False))
    for idx in (torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([0, 2, 3]), torch.tensor([1, 2])):
        acc, ref = {}, {}
        rule.chosen_into(acc, f, None, idx)
        rule.chosen_into(ref, plain, None, idx)
        assert set(acc) == set(ref)
        for p in ref:
            close(acc[p], ref[p])
    # the merged strategy's split: each part keeps its own rows of the support
    gen, tgt = f.rows(slice(0, 3)), f.rows(slice(3, None))
    assert gen.support == [(3, 7), (9, 13)] and tgt.support == []
    close(rule.pairwise_scores(gen, f.rows(slice(1, 2)), False),
          rule.pairwise_scores(Factors(gen.a, gen.d), Factors(f.a[1:2], f.d[1:2]), False))


def test_a_narrow_layer_does_not_look_for_zero_rows():
    rule = LinearRule(nn.Linear(D, 16).double())
    x = torch.randn(2, 3, D, dtype=torch.float64)
    d = torch.zeros(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        _, f = rule.tap_backward(x, d, False)
    assert f.support is None


def test_a_backward_that_builds_a_graph_keeps_the_plain_path():
    rule = LinearRule(nn.Linear(D, VOCAB).double())
    x = torch.randn(2, 3, D, dtype=torch.float64)
    d = torch.zeros(2, 3, VOCAB, dtype=torch.float64)
    _, f = rule.tap_backward(x, d, True)       # grad mode on, as under create_graph=True
    assert f.support is None


# ------------------------------------------------------------------------------------------
# the engine against the oracle, with the search on in every Linear layer

CASES = [("llama_tied", "layerwise", "layer", "pairwise_ghost", "merged"),
         ("llama_tied", "layerwise", "layer", "auto", "separate"),
         ("llama_tied", "global", "layer", "direct", "merged"),
         ("llama_untied_bias", "layerwise", "layer", "reduced_ghost", "separate"),
         ("llama_untied_bias", "filter", "global", "pairwise_ghost", "merged"),
         ("gpt2", "layerwise", "layer", "pairwise_ghost", "separate"),
         ("gpt2", "global", "layer", "auto", "merged"),
         ("llama_lora", "layerwise", "layer", "auto", "merged"),
         ("tiny_lm", "layerwise", "layer", "direct", "separate")]


@pytest.fixture
def search_everywhere(monkeypatch):
    found = []
    original = LinearRule.tap_backward

    def spy(self, x, d, need):
        grad, f = original(self, x, d, need)
        found.append(f.support)
        return grad, f
    monkeypatch.setattr(LinearRule, "support_min_width", 1)
    monkeypatch.setattr(LinearRule, "tap_backward", spy)
    return found


@pytest.mark.parametrize("model_name,feasible,scope,backend,strategy", CASES)
def test_engine_with_zero_rows_skipped_matches_the_oracle(search_everywhere, model_name, feasible, scope, backend,
                                                          strategy):
    case = get_case(model_name)
    model = case.fresh()
    reg = make_reg(model, feasible, scope, backend, strategy, case=case)
    reg.backward(case.general, case.target)
    assert any(s for s in search_everywhere), "no Linear layer found a zero row: the test exercises nothing"
    check_scores(reg, case.oracle, rows=False)
    masks = expected_masks(case, reg, feasible, scope)
    O.assert_grads(model, expected_grads(case, feasible, masks), f"{model_name}/{feasible}/{backend}/{strategy}")
    reg.detach()


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_sketch_scores_are_unchanged_by_skipping_zero_rows(monkeypatch, strategy):
    case = get_case("llama_tied")

    def run():
        model = case.fresh()
        reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, scoring="sketch", sketch="gaussian-8x8",
                              target_strategy=strategy)
        reg.backward(case.general, case.target)
        out = ({n: s.clone() for n, s in reg.last_scores.items()},
               {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        reg.detach()
        return out

    ref_scores, ref_grads = run()
    monkeypatch.setattr(LinearRule, "support_min_width", 1)
    scores, grads = run()
    for n in ref_scores:
        torch.testing.assert_close(scores[n], ref_scores[n], rtol=1e-10, atol=1e-12)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12)


def test_the_real_vocabulary_head_skips_the_prompt_rows(monkeypatch):
    """A Llama with SmolLM2's vocabulary (49152 >= 8192): the lm_head's support is found without
    lowering the width, and it is the supervised positions of the batch."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    seen = {}
    original = LinearRule.tap_backward

    def spy(self, x, d, need):
        grad, f = original(self, x, d, need)
        seen[self.out_features] = f.support
        return grad, f
    monkeypatch.setattr(LinearRule, "tap_backward", spy)
    ids = torch.randint(1, 49152, (3, 8))
    labels = ids.clone()
    labels[:, :3] = -100                        # positions 0-1 predict unsupervised tokens
    general = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    target = copy.deepcopy(general)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, target_strategy="separate")
    reg.backward(general, target)
    # shifted labels: position s predicts token s + 1, so 2..6 are supervised, 0-1 and 7 are not
    assert seen[49152] == [(2 + 8 * i, 7 + 8 * i) for i in range(3)]
    assert seen[16] is None and seen[32] is None
    reg.detach()
