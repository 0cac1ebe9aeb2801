"""Bad input gives a clear exception naming the problem; non-finite losses error or skip cleanly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models_tiny as mt
import oracles as O
from conftest import import_engine
from test_engine_oracle import FRAC, get_case, expected_masks, expected_grads


def make(model, **kw):
    DataRegularizer = import_engine()
    return DataRegularizer(model, **kw)


def _batches():
    case = get_case("tiny_lm")
    return case, {k: v.clone() for k, v in case.general.items()}, {k: v.clone() for k, v in case.target.items()}


def _construct_and_step(model, general, target, **kw):
    reg = make(model, **kw)
    reg.backward(general, target)
    return reg


# ------------------------------------------------------------------------------------------
# batches

@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible", ["layerwise", "global", "target_only"])
def test_target_without_supervised_tokens(feasible, strategy):
    case, general, target = _batches()
    target["labels"][:] = -100
    with pytest.raises(ValueError, match="target"):
        _construct_and_step(case.fresh(), general, target, feasible_set=feasible, target_strategy=strategy)


def test_target_only_first_token_supervised_is_no_token():
    """labels[:, 0] is never predicted (HF shift): a target whose only label is at position 0 has
    no supervised token."""
    case, general, target = _batches()
    target["labels"][:] = -100
    target["labels"][:, 0] = 5
    with pytest.raises(ValueError, match="target"):
        _construct_and_step(case.fresh(), general, target, feasible_set="layerwise")


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible", ["layerwise", "global", "standard"])
def test_general_without_supervised_tokens(feasible, strategy):
    case, general, target = _batches()
    general["labels"][:] = -100
    with pytest.raises(ValueError, match="general"):
        _construct_and_step(case.fresh(), general, target, feasible_set=feasible, target_strategy=strategy)


@pytest.mark.parametrize("role", ["general", "target"])
@pytest.mark.parametrize("key", ["labels", "input_ids"])
def test_float_tensors_rejected(role, key):
    case, general, target = _batches()
    batch = general if role == "general" else target
    batch[key] = batch[key].double()
    with pytest.raises((TypeError, ValueError), match=key):
        _construct_and_step(case.fresh(), general, target, feasible_set="layerwise")


def test_shape_mismatch_rejected():
    case, general, target = _batches()
    general["labels"] = general["labels"][:, :-1]
    with pytest.raises((TypeError, ValueError), match="labels"):
        _construct_and_step(case.fresh(), general, target, feasible_set="layerwise")


def test_missing_key_rejected():
    case, general, target = _batches()
    del target["labels"]
    with pytest.raises((TypeError, ValueError), match="labels"):
        _construct_and_step(case.fresh(), general, target, feasible_set="layerwise")


def test_meta_device_batch_rejected():
    """A batch on another device than the model (meta stands in for a GPU on a CPU-only box)."""
    case, general, target = _batches()
    general = {k: v.to("meta") for k, v in general.items()}
    with pytest.raises((TypeError, ValueError, RuntimeError), match="device|meta"):
        _construct_and_step(case.fresh(), general, target, feasible_set="layerwise")


# ------------------------------------------------------------------------------------------
# configuration

@pytest.mark.parametrize("frac", [0, 0.0, -0.1, 1.5, 2])
@pytest.mark.parametrize("feasible", ["layerwise", "global", "filter", "rowwise", "random", "greedy"])
def test_bad_frac(feasible, frac):
    case, general, target = _batches()
    with pytest.raises(ValueError, match="frac"):
        _construct_and_step(case.fresh(), general, target, feasible_set=feasible, frac=frac)


@pytest.mark.parametrize("kw,word", [
    (dict(feasible_set="topk"), "feasible"),
    (dict(feasible_set="LayerWiseSubset"), "feasible"),
    (dict(scoring="ghost"), "scoring"),
    (dict(scoring="compress"), "scoring"),
    (dict(target_strategy="both"), "target_strategy|strategy"),
    (dict(score_norm="l2"), "score_norm"),
    (dict(scope="model"), "scope"),
    (dict(nonfinite="ignore"), "nonfinite"),
    (dict(scoring="sketch", sketch="gauss-8"), "sketch"),
])
def test_unknown_options(kw, word):
    case, general, target = _batches()
    with pytest.raises(ValueError, match=word):
        _construct_and_step(case.fresh(), general, target, **kw)


def test_not_a_module():
    with pytest.raises(TypeError, match="Module|model"):
        make(lambda input_ids, attention_mask=None: None)


# ------------------------------------------------------------------------------------------
# models without a supported layer

def test_all_parameters_frozen():
    case = get_case("tiny_lm")
    model = case.fresh()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no .*layer"):
        _construct_and_step(model, case.general, case.target, feasible_set="layerwise")


class NormOnlyLM(nn.Module):
    """Trainable parameters exist, but none of them is in a supported layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(mt.VOCAB, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, mt.VOCAB)
        self.embed.weight.requires_grad_(False)
        self.head.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.norm(self.embed(input_ids)))


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_no_supported_layer(strategy):
    case = get_case("tiny_lm")
    model = NormOnlyLM().double()
    with pytest.raises(ValueError, match=r"no .*layer"):
        _construct_and_step(model, case.general, case.target, feasible_set="layerwise", target_strategy=strategy)


def test_no_supported_layer_leaves_no_hooks():
    case = get_case("tiny_lm")
    model = NormOnlyLM().double()
    with pytest.raises(ValueError):
        _construct_and_step(model, case.general, case.target, feasible_set="layerwise")
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


# ------------------------------------------------------------------------------------------
# non-finite losses

def nan_row_loss(logits, batch):
    """Causal CE, but rows containing token 127 get a NaN loss."""
    losses, mask = O.causal_token_losses(logits, batch)
    bad = (batch["input_ids"] == 127).any(1, keepdim=True)
    return torch.where(bad, torch.full_like(losses, float("nan")), losses), mask


def _poison(batch, row):
    batch = {k: v.clone() for k, v in batch.items()}
    batch["input_ids"][row, 1] = 127
    return batch


def _nan_model(case):
    model = case.fresh()
    with torch.no_grad():
        model.fc2.bias[3] = float("nan")
    return model


NAN_SOURCES = ["general_row", "target_row", "weights"]


def _nan_setup(source):
    case = get_case("tiny_lm")
    general = case.general.copy()
    target = case.target.copy()
    for b in (general, target):   # make sure token 127 does not occur by chance
        b["input_ids"] = b["input_ids"].clamp(max=126)
    kw = dict(loss_fn=nan_row_loss)
    if source == "general_row":
        general = _poison(general, 2)
        model = case.fresh()
    elif source == "target_row":
        target = _poison(target, 1)
        model = case.fresh()
    else:
        model = _nan_model(case)
        kw = {}
    return case, model, general, target, kw


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible", ["layerwise", "global", "standard", "target_only"])
@pytest.mark.parametrize("source", NAN_SOURCES)
def test_nonfinite_error(source, feasible, strategy):
    case, model, general, target, kw = _nan_setup(source)
    if source == "target_row" and feasible == "standard":
        pytest.skip("standard training does not look at the target batch")
    if source == "general_row" and feasible == "target_only":
        pytest.skip("target-only training does not look at the general batch's loss")
    reg = make(model, feasible_set=feasible, target_strategy=strategy, nonfinite="error", **kw)
    with pytest.raises(Exception, match="non-finite"):
        reg.backward(general, target)


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible", ["layerwise", "global", "rowwise", "standard", "target_only"])
@pytest.mark.parametrize("source", NAN_SOURCES)
def test_nonfinite_skip(source, feasible, strategy):
    case, model, general, target, kw = _nan_setup(source)
    if source == "target_row" and feasible == "standard":
        pytest.skip("standard training does not look at the target batch")
    if source == "general_row" and feasible == "target_only":
        pytest.skip("target-only training does not look at the general batch's loss")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    # one real optimizer step first, so a zero (rather than None) gradient would still move AdamW
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = None
    reg = make(model, feasible_set=feasible, target_strategy=strategy, nonfinite="skip", **kw)
    stats = reg.backward(general, target)
    assert stats.to_dict()["skipped"] is True or stats.to_dict()["skipped"] == 1.0
    for n, p in model.named_parameters():
        assert p.grad is None, f"{n}.grad was set on a skipped step"
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b) or (torch.isnan(b).any() and torch.equal(p.isnan(), b.isnan())), \
            "optimizer step after a skipped step changed a parameter"
    reg.detach()


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_nonfinite_skip_discards_existing_step_grads(strategy):
    """Gradients already in .grad when the step is skipped are cleared too (the step's grads are
    set to None), so the optimizer step is a no-op."""
    case, model, general, target, kw = _nan_setup("general_row")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    reg = make(model, feasible_set="layerwise", target_strategy=strategy, nonfinite="skip", **kw)
    assert reg.backward(general, target).to_dict()["skipped"]
    for n, p in model.named_parameters():
        assert p.grad is None, f"{n}.grad kept on a skipped step"
    reg.detach()


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_step_after_skip_is_normal(strategy):
    case, model, general, target, kw = _nan_setup("general_row")
    reg = make(model, feasible_set="layerwise", target_strategy=strategy, nonfinite="skip", **kw)
    assert reg.backward(general, target).to_dict()["skipped"]
    clean_general = case.general.copy()
    clean_general["input_ids"] = clean_general["input_ids"].clamp(max=126)
    clean_target = case.target.copy()
    clean_target["input_ids"] = clean_target["input_ids"].clamp(max=126)
    stats = reg.backward(clean_general, clean_target)
    assert not stats.to_dict()["skipped"]
    orc = O.Oracle(case.model, clean_general, clean_target)
    k = O.num_selected(orc.B, FRAC)
    masks = {n: O.naive_topk(orc.scores[n], k) for n in orc.names}
    for n in orc.names:
        assert torch.equal(reg.last_masks[n].cpu(), masks[n])
    O.assert_grads(model, orc.expected_grads(masks), "step after a skipped step")
    reg.detach()
