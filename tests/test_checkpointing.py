"""Activation (gradient) checkpointing under the engine: the same run with and without it.

Checkpointing re-runs a block's forward inside the backward, so drpost's forward hooks fire twice
per call. The oracle is the run without checkpointing (float64, same seeds): every step's
``.grad`` (relative error < 1e-9), the masks, the scoring back-ends and the parameters after an
SGD step are identical, and every layer is still processed inside the backward (nothing is left
for the end-of-backward flush, which would hold every layer's factors until the end).
"""
from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import models_tiny as mt
import oracles as O
from conftest import import_engine

TOL = 1e-9
STEPS, B, V, SEQ = 2, 4, 2, 8
logging.getLogger("transformers").setLevel(logging.ERROR)


def hf_llama():
    return mt.llama(tied=True, num_layers=2, seed=3)


def hf_checkpointing(model, reentrant):
    model.train()       # HF checkpoints only in training mode (dropout is 0 in the tiny models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


class CheckpointedLM(nn.Module):
    """A custom LM whose block runs under ``torch.utils.checkpoint``: a broadcast position
    embedding ([1, T] ids), a LayerNorm (row-restricted rule) and one Linear called twice (a group
    with two calls) inside the block; the token embedding and the head outside it."""

    def __init__(self, reentrant=None, dim=16):
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Embedding(mt.VOCAB, dim)
        self.pos = nn.Embedding(32, dim)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, mt.VOCAB)

    def block(self, h):
        h = h + self.pos(torch.arange(h.shape[1]).unsqueeze(0))
        h = torch.tanh(self.mix(self.norm(h)))
        return h + torch.tanh(self.mix(h))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        h = h.cumsum(1) / steps
        if self.reentrant is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


def custom_lm(reentrant=None):
    torch.manual_seed(11)
    m = CheckpointedLM(reentrant)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.4)
    return mt._finish(m, 11)


def batches(micro=1):
    general = [[mt.make_batch(B, SEQ, seed=100 + 10 * s + j) for j in range(micro)] for s in range(STEPS)]
    target = [mt.make_batch(V, SEQ, seed=200 + s) for s in range(STEPS)]
    return general, target


def train(model, general, target, **kw):
    """STEPS SGD steps; per step the .grad, masks, back-ends, and which layers the end-of-backward
    flush found unfinished."""
    DataRegularizer = import_engine()
    kw.setdefault("frac", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = DataRegularizer(model, **kw)
    pipe = reg._pipeline
    flushed = []
    real_flush = pipe.flush_pending

    def flush():
        flushed.extend(g.name for g in pipe.groups if g.pending)
        real_flush()
    pipe.flush_pending = flush
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    record = []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        masks = []
        for j, g in enumerate(general[s]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reg.backward(g, target[s], finalize=j == len(general[s]) - 1)
            masks.append({k: v.clone() for k, v in reg.last_masks.items()})
        record.append({"grads": O.grads_of(model), "masks": masks, "backends": dict(reg.layer_backends)})
        opt.step()
    reg.detach()
    return record, flushed


def assert_same(got, ref, what):
    (got, got_flushed), (ref, _) = got, ref
    assert not got_flushed, f"{what}: layers {got_flushed} were not finished inside the backward"
    for s, (a, b) in enumerate(zip(got, ref)):
        assert a["grads"].keys() == b["grads"].keys()
        for n, e in b["grads"].items():
            if e is None:
                assert a["grads"][n] is None, f"{what} step {s}: {n}.grad"
                continue
            O.assert_close(a["grads"][n], e, f"{what} step {s}: {n}.grad", TOL)
        assert a["backends"] == b["backends"], f"{what} step {s}: scoring back-ends differ"
        assert len(a["masks"]) == len(b["masks"])
        for ma, mb in zip(a["masks"], b["masks"]):
            assert ma.keys() == mb.keys(), what
            for k in mb:
                assert torch.equal(ma[k], mb[k]), f"{what} step {s}: mask of {k}"


# every feasible set and both target strategies at least once, each with both checkpoint modes
MATRIX = [("layerwise", "merged", {}), ("layerwise", "separate", {"refresh_every": 2}),
          ("global", "separate", {}), ("filter", "merged", {"scope": "global"}),
          ("rowwise", "merged", {}), ("greedy", "separate", {}), ("random", "merged", {}),
          ("standard", "merged", {}), ("target_only", "separate", {}),
          ("layerwise", "merged", {"scoring": "pairwise_ghost"}), ("global", "merged", {"scoring": "direct"})]


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("fset,strategy,extra", MATRIX, ids=[f"{f}-{s}-{'-'.join(map(str, e.values()))}"
                                                              for f, s, e in MATRIX])
def test_hf_checkpointing_is_the_run_without_it(fset, strategy, extra, reentrant):
    general, target = batches()
    kw = dict(feasible_set=fset, target_strategy=strategy, **extra)
    ref = train(hf_llama(), general, target, **kw)
    model = hf_llama()
    hf_checkpointing(model, reentrant)
    assert model.is_activation_checkpointing
    assert_same(train(model, general, target, **kw), ref, f"{fset}/{strategy}/reentrant={reentrant}")


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("fset,strategy", [("layerwise", "merged"), ("global", "separate")])
def test_gradient_accumulation_with_checkpointing(fset, strategy, reentrant):
    general, target = batches(micro=2)
    kw = dict(feasible_set=fset, target_strategy=strategy)
    ref = train(hf_llama(), general, target, **kw)
    model = hf_llama()
    hf_checkpointing(model, reentrant)
    assert_same(train(model, general, target, **kw), ref, f"accumulated {fset}/{strategy}/{reentrant}")


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("fset,strategy", [("layerwise", "merged"), ("rowwise", "separate")])
def test_peft_lora_with_checkpointing(fset, strategy, reentrant):
    """LoRA: the embeddings are frozen, so reentrant checkpointing needs the inputs to require grad
    (HF's gradient_checkpointing_enable calls enable_input_require_grads through the PEFT wrapper)."""
    general, target = batches()
    kw = dict(feasible_set=fset, target_strategy=strategy)
    ref = train(mt.llama_lora(seed=5), general, target, **kw)
    model = mt.llama_lora(seed=5)
    hf_checkpointing(model, reentrant)
    assert_same(train(model, general, target, **kw), ref, f"lora {fset}/{strategy}/{reentrant}")


def test_reentrant_lora_without_input_grads_is_explained():
    model = mt.llama_lora(seed=5)
    hf_checkpointing(model, True)
    model.disable_input_require_grads()
    DataRegularizer = import_engine()
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5)
    general, target = batches()
    with pytest.raises(RuntimeError, match="enable_input_require_grads"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg.backward(general[0][0], target[0])


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("fset,strategy", [("layerwise", "merged"), ("greedy", "merged"), ("global", "separate"),
                                           ("rowwise", "separate")])
def test_torch_checkpoint_around_a_custom_block(fset, strategy, reentrant):
    general, target = batches()
    kw = dict(feasible_set=fset, target_strategy=strategy)
    ref = train(custom_lm(None), general, target, **kw)
    assert_same(train(custom_lm(reentrant), general, target, **kw), ref, f"custom {fset}/{strategy}/{reentrant}")


@pytest.fixture
def hf_checkpoints(monkeypatch):
    """Counts the checkpointed calls that transformers makes (it binds this function when enabled)."""
    import transformers.modeling_utils as mu

    calls = []
    real = mu.checkpoint

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)
    monkeypatch.setattr(mu, "checkpoint", counted)
    return calls


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_drpost_trainer_with_gradient_checkpointing(tmp_path, reentrant, hf_checkpoints):
    """TrainingArguments(gradient_checkpointing=True): the Trainer enables it on the model; the run
    equals the one without (parameters after 4 steps, the last masks)."""
    from test_trainer import assert_params_close, drpost_run, params_of

    kw = dict(feasible_set="layerwise", frac=0.5, target_batch_size=4, gradient_accumulation_steps=2)
    ref, ref_model = drpost_run(tmp_path, "plain", model=hf_llama(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, model = drpost_run(tmp_path, "ckpt", model=hf_llama(), gradient_checkpointing=True,
                                gradient_checkpointing_kwargs={"use_reentrant": reentrant}, **kw)
    assert model.is_activation_checkpointing
    assert hf_checkpoints and set(hf_checkpoints) == {reentrant}   # 2 layers x 8 micro-batches
    assert_params_close(params_of(model), params_of(ref_model), rtol=1e-9, atol=1e-12)
    for k, m in ref.regularizer.last_masks.items():
        assert torch.equal(got.regularizer.last_masks[k], m), k


def test_recipe_trains_with_gradient_checkpointing(tmp_path, hf_checkpoints):
    """`drpost train` with train.gradient_checkpointing: the run trains (the adapter moves) and is
    the run without checkpointing (same losses and selections, same adapter)."""
    from test_cli_train import QUIET, TINY, _adapter

    from drpost.cli import main
    from drpost.models import smollm2_path

    smollm2_path()   # a first-use conversion happens before both runs, not inside the first

    common = [TINY, "--train.steps", "3", "--train.save_steps", "0", "--train.eval_every", "0",
              "--eval.at_start", "false", "--eval.n_test", "1", "--output_dir", str(tmp_path), *QUIET]
    assert main(["train", *common, "--run_name", "plain"]) == 0
    assert not hf_checkpoints
    assert main(["train", *common, "--run_name", "ckpt", "--train.gradient_checkpointing", "true"]) == 0
    assert hf_checkpoints and set(hf_checkpoints) == {False}
    hist = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["history"]["train"]
    ref_hist = json.loads((tmp_path / "plain" / "metrics.json").read_text())["history"]["train"]
    for key in ("loss", "selected_tokens"):
        assert [h[key] for h in hist] == pytest.approx([h[key] for h in ref_hist], rel=1e-6), key
    got, ref = _adapter(tmp_path / "ckpt"), _adapter(tmp_path / "plain")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)
    lora_b = [k for k in got if "lora_B" in k]     # initialised to zero by peft: non-zero once trained
    assert lora_b and all(float(got[k].abs().max()) > 0 for k in lora_b)


def test_recipe_config_keys():
    from drpost.config import ConfigError, load_config

    cfg = load_config(None, ["--train.gradient_checkpointing", "true", "--train.checkpoint_reentrant", "true"])
    assert cfg.train.gradient_checkpointing and cfg.train.checkpoint_reentrant
    assert not load_config(None).train.gradient_checkpointing
    with pytest.raises(ConfigError, match="train.checkpoint_reentrant.*gradient_checkpointing: true"):
        load_config(None, ["--train.checkpoint_reentrant", "true"])


def test_rl_recipe_with_gradient_checkpointing(tmp_path, hf_checkpoints):
    """The RL recipe enables it on the policy; the run is the one without (same rewards, kept
    shares and losses)."""
    from test_rl_recipe import TINY as RL_TINY

    from drpost.cli import main
    from drpost.models import smollm2_path

    smollm2_path()
    common = [RL_TINY, "--output_dir", str(tmp_path), "--no-progress"]
    assert main(["train", *common, "--run_name", "plain"]) == 0
    assert not hf_checkpoints
    assert main(["train", *common, "--run_name", "ckpt", "--train.gradient_checkpointing", "true"]) == 0
    assert hf_checkpoints
    hist = [json.loads((tmp_path / n / "metrics.json").read_text())["history"]["train"] for n in ("ckpt", "plain")]
    assert len(hist[0]) == len(hist[1])
    for got, ref in zip(*hist):
        for key in ("reward", "kept", "loss"):
            if key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (key, got, ref)
