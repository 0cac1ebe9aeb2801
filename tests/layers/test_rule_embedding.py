"""nn.Embedding through the rule check: padding_idx rows, and a position embedding indexed by
[1, T] ids and broadcast over the batch (the rule allows a broadcast input)."""
from __future__ import annotations

import torch
from torch import nn

import models_tiny as mt
from rule_check import BACKENDS, DIM, RuleCase, check_rule, finish


class EmbedLM(nn.Module):
    def __init__(self, positions: bool):
        super().__init__()
        self.tok = nn.Embedding(mt.VOCAB, DIM, padding_idx=mt.PAD_ID)
        self.pos = nn.Embedding(32, DIM) if positions else None
        self.head = nn.Linear(DIM, mt.VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.tok(input_ids)
        if self.pos is not None:
            h = h + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device)[None])
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
        return self.head(torch.tanh(h.cumsum(1) / steps))


def embed_lm(positions: bool, seed: int = 13) -> nn.Module:
    torch.manual_seed(seed)
    model = EmbedLM(positions)
    return finish(model, 0.5, frozen=("head",), pad_rows=(model.tok,))


def test_embedding_rule():
    used = check_rule(RuleCase(embed_lm(positions=False), seed=3, vocab=12))
    assert all(b == {"tok": "reduced_ghost"} for b in used.values()), used   # always the exact gather-dot


def test_broadcast_position_embedding():
    used = check_rule(RuleCase(embed_lm(positions=True), seed=3, vocab=12), backends=BACKENDS[:2])
    assert all(set(b) == {"tok", "pos"} for b in used.values())


def test_embedding_layout():
    from drpost.layers import EmbeddingRule, scored_rule_for

    emb = nn.Embedding(10, 4)
    rule = scored_rule_for(emb)
    assert type(rule) is EmbeddingRule and rule.num_rows() == 10 and rule.row_axis(emb.weight) == 0
    assert rule.broadcast_input_ok is True and rule.tied_form == "lookup"
    assert rule.supports == ("reduced_ghost",)
