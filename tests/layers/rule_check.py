"""The one check every layer rule passes (Opacus-style): train a small float64 model through
DataRegularizer and compare, for every scoring back-end and both target strategies, the rule's
scores and the chosen-sample gradient with per-sample backward passes at batch size 1
(tests/oracles.py); then row-level scores, cosine-normalised choices and the greedy Gram matrix.

``ProbeLM`` wraps the module under test between a frozen embedding and a frozen LM head, so
that the module is the only scored layer (unless the test unfreezes more).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import models_tiny as mt
import oracles as O
from test_engine_oracle import _pick_greedy_lr, check_scores, expected_grads, expected_masks, make_reg

B, V, SEQ = 6, 3, 10
DIM, HIDDEN = 16, 24
BACKENDS = ["reduced_ghost", "pairwise_ghost", "direct", "sketch", "auto"]
IDENTITY_SKETCH = "gaussian-512x512"    # wider than every tiny layer: the sketch is exact


class ProbeLM(nn.Module):
    """Frozen embedding -> causal prefix mean -> [norm] -> layer -> tanh -> frozen head."""

    def __init__(self, layer: nn.Module, out_dim: int = HIDDEN, norm: nn.Module | None = None):
        super().__init__()
        self.embed = nn.Embedding(mt.VOCAB, DIM)
        self.norm = norm
        self.layer = layer
        self.head = nn.Linear(out_dim, mt.VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
        h = h.cumsum(1) / steps
        if self.norm is not None:
            h = self.norm(h)
        return self.head(torch.tanh(self.layer(h)))


def finish(model: nn.Module, std: float, frozen: tuple = (), pad_rows: tuple = ()) -> nn.Module:
    """N(0, std) weights, the padding row of each embedding in ``pad_rows`` zero, the top-level
    submodules in ``frozen`` frozen; float64, eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        for emb in pad_rows:
            emb.weight[emb.padding_idx].zero_()
    for name, p in model.named_parameters():
        if name.split(".")[0] in frozen:
            p.requires_grad_(False)
    return model.double().eval()


def probe(layer: nn.Module, out_dim: int = HIDDEN, norm: nn.Module | None = None, seed: int = 0,
          frozen: tuple = ("embed", "head")) -> nn.Module:
    torch.manual_seed(seed)
    return finish(ProbeLM(layer, out_dim, norm), 0.4, frozen)


class RuleCase:
    """A model with its batches and oracle, shaped like test_engine_oracle.Case."""

    def __init__(self, model: nn.Module, seed: int = 0, scored_types: dict | None = None, vocab: int = mt.VOCAB):
        self.model = model
        self.general = mt.make_batch(B, SEQ, seed=100 + seed, vocab=vocab)    # a small vocab: tokens
        self.target = mt.make_batch(V, SEQ, seed=200 + seed, vocab=vocab)     # shared with the target
        self.oracle = O.Oracle(model, self.general, self.target, scored_types=scored_types)
        self._greedy_lr = {}

    @property
    def greedy_lr(self) -> dict:
        if not self._greedy_lr:
            self._greedy_lr["layer"] = _pick_greedy_lr(self.oracle, "layer")
        return self._greedy_lr

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)


def run(case: RuleCase, feasible: str, scoring: str, strategy: str, score_norm: str = "none"):
    model = case.fresh()
    reg = make_reg(model, feasible, scoring=scoring, strategy=strategy, score_norm=score_norm, case=case,
                   sketch=IDENTITY_SKETCH)
    if strategy == "separate":
        reg.capture_target(case.target)
        reg.backward(case.general)
    else:
        reg.backward(case.general, case.target)
    return model, reg


def check_step(case: RuleCase, feasible: str, scoring: str, strategy: str, score_norm: str = "none",
               scores: bool = True):
    model, reg = run(case, feasible, scoring, strategy, score_norm)
    what = f"{feasible}/{scoring}/{strategy}/{score_norm}"
    if scores:
        check_scores(reg, case.oracle, rows=feasible == "rowwise")
    masks = expected_masks(case, reg, feasible, "layer", score_norm)
    O.assert_grads(model, expected_grads(case, feasible, masks), what)
    return reg


def check_rule(case: RuleCase, backends=BACKENDS, strategies=("merged", "separate")) -> dict:
    """Every check above; returns {scoring: layer_backends} of the layerwise runs."""
    used = {}
    for scoring in backends:
        for strategy in strategies:
            reg = check_step(case, "layerwise", scoring, strategy)
            used[(scoring, strategy)] = dict(reg.layer_backends)
    for scoring in ("reduced_ghost", "pairwise_ghost"):
        check_step(case, "rowwise", scoring, "merged")
    for scoring in ("reduced_ghost", "direct", "sketch"):
        check_step(case, "layerwise", scoring, "merged", score_norm="cosine")
        check_step(case, "greedy", scoring, "merged")
    check_step(case, "layerwise", "pairwise_ghost", "separate", score_norm="cosine")
    return used
