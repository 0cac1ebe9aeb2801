"""Engine behaviour not covered by the layer x back-end x feasible-set matrix: parameters outside
every layer rule, custom leaf modules, chunked target capture, a target batch larger than the
general batch, bf16 autocast, and refused configurations."""
import pytest
import torch
from torch import nn

import models_tiny as mt
import oracles
from drpost import DataRegularizer


class ScaledLM(nn.Module):
    """TinyLM plus (a) a raw nn.Parameter used directly by the top module (no layer rule can
    cover it) and (b) a custom leaf module with its own parameter (trained like a norm)."""

    class Gate(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.g = nn.Parameter(torch.linspace(0.5, 1.5, dim))

        def forward(self, x):
            return x * self.g

    def __init__(self):
        super().__init__()
        self.inner = mt.tiny_lm()
        self.gate = self.Gate(mt.VOCAB).double()
        self.temperature = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        return self.gate(self.inner(input_ids, attention_mask)) * self.temperature


def test_uncovered_parameter_gets_plain_general_gradient_with_one_warning():
    model = ScaledLM()
    general, target = mt.make_batch(5, 9, seed=1), mt.make_batch(2, 9, seed=2)
    with pytest.warns(UserWarning) as record:
        reg = DataRegularizer(model, feasible_set="layerwise", target_strategy="separate")
    messages = [str(w.message) for w in record]
    assert any("temperature" in m and "plain general-batch gradient" in m for m in messages)
    assert any("gate" in m and "Gate" in m for m in messages)          # custom leaf module, named
    rows, tokens = oracles.per_sample_grads(model, general)
    reg.backward(general, target)
    for name in ("temperature", "gate.g", "inner.norm.weight"):
        expected = sum(r[name] for r in rows) / tokens.sum()
        oracles.assert_close(dict(model.named_parameters())[name].grad, expected, name)
    model.zero_grad(set_to_none=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # the warning is one-time: a second step is silent
        reg.backward(general, target)


def test_uncovered_parameter_refused_by_merged_strategy():
    with pytest.raises(ValueError, match="separate"):
        DataRegularizer(ScaledLM(), feasible_set="layerwise", target_strategy="merged")


def test_custom_leaf_module_is_row_restricted_in_merged_batches():
    """A leaf module with trainable parameters gets the general rows' gradient even when the
    target rows share its forward (merged strategy)."""
    model = ScaledLM()
    model.temperature.requires_grad_(False)
    general, target = mt.make_batch(5, 9, seed=3), mt.make_batch(3, 9, seed=4)
    with pytest.warns(UserWarning, match="Gate"):
        reg = DataRegularizer(model, feasible_set="global", target_strategy="merged")
    rows, tokens = oracles.per_sample_grads(model, general)
    reg.backward(general, target)
    expected = sum(r["gate.g"] for r in rows) / tokens.sum()
    oracles.assert_close(model.gate.g.grad, expected, "gate.g")


@pytest.mark.parametrize("scoring", ["reduced_ghost", "pairwise_ghost", "sketch"])
def test_chunked_target_capture_equals_one_capture(scoring):
    """A target batch larger than the general batch, captured in chunks, gives the same scores as
    one capture (pairwise factors are concatenated, never overwritten)."""
    model = mt.llama(tied=True)
    general, target = mt.make_batch(4, 10, seed=5), mt.make_batch(9, 10, seed=6)
    kw = dict(feasible_set="layerwise", scoring=scoring, target_strategy="separate", refresh_every=5)
    one = DataRegularizer(model, **kw)
    one.capture_target(target)
    one.backward(general)
    scores = {k: v.clone() for k, v in one.last_scores.items()}
    one.detach()
    chunked = DataRegularizer(model, **kw)
    chunked.capture_target(target, chunk_size=4)
    chunked.backward(general)
    for k, v in scores.items():
        torch.testing.assert_close(chunked.last_scores[k], v, rtol=1e-9, atol=1e-12)


def test_target_batch_larger_than_general_merged_matches_oracle():
    model = mt.gpt2()
    general, target = mt.make_batch(3, 8, seed=7), mt.make_batch(7, 11, seed=8)
    reg = DataRegularizer(model, feasible_set="layerwise", scoring="auto")
    reg.backward(general, target)
    t_rows, t_tokens = oracles.per_sample_grads(model, target)
    g_rows, _ = oracles.per_sample_grads(model, general)
    params = dict(model.named_parameters())
    g_t = {n: sum(r[n] for r in t_rows) / t_tokens.sum() for n in params}
    name = "transformer.h.0.mlp.c_fc"
    expected = torch.stack([sum((r[n] * g_t[n]).sum() for n in (name + ".weight", name + ".bias")) for r in g_rows])
    oracles.assert_close(reg.last_scores[name], expected, "scores")


def test_bf16_autocast_close_to_fp32():
    """Under bf16 autocast the selection inputs stay float32 and the gradients stay close to fp32."""
    model = mt.llama(tied=True).float()
    general, target = mt.make_batch(6, 12, seed=9), mt.make_batch(2, 12, seed=10)
    reg = DataRegularizer(model, feasible_set="standard")
    reg.backward(general, target)
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.detach()
    model.zero_grad(set_to_none=True)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = reg.backward(general, target)
    assert all(s.dtype == torch.float32 for s in reg.last_scores.values())
    assert stats.general_loss.dtype == torch.float32
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        err = (p.grad - ref[n]).norm() / ref[n].norm()
        assert err < 0.05, (n, float(err))


def test_missing_target_batch_is_explained():
    model = mt.llama(tied=True)
    reg = DataRegularizer(model, feasible_set="layerwise")
    with pytest.raises(ValueError, match="target batch is required"):
        reg.backward(mt.make_batch(3, 8, seed=11))
