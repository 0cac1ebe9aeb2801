"""Parameters shared by several modules: one group, every use counted (METHOD §9.4).

Tied input/output embeddings are scored from factors (layers/tied.py) when the rules declare
their tied_form; two lookups sharing a table, a module called twice, and a registered custom
rule that declares no tied_form are scored through the collapsed dense target."""
from __future__ import annotations

import torch
from torch import nn

import models_tiny as mt
from custom_layer import SCORED_TYPES, ScaledLinear, register
from rule_check import DIM, RuleCase, check_rule, finish


class SharedLM(nn.Module):
    """Embedding -> prefix mean -> tanh -> one of: a tied head, a second lookup of the same
    table (ids shifted by one), the same embedding called twice, a custom layer sharing the table."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Embedding(mt.VOCAB, DIM, padding_idx=mt.PAD_ID)
        self.head = nn.Linear(DIM, mt.VOCAB, bias=False)
        if how == "tied_head":
            self.head.weight = self.embed.weight
        if how == "two_lookups":
            self.lookup2 = nn.Embedding(mt.VOCAB, DIM)
            self.lookup2.weight = self.embed.weight
        if how == "custom":
            self.custom = ScaledLinear(DIM, mt.VOCAB)
            self.custom.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if self.how == "two_lookups":
            h = h + 0.5 * self.lookup2(input_ids.roll(1, 1))
        if self.how == "called_twice":
            h = h + 0.5 * self.embed(input_ids.roll(1, 1))
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
        h = torch.tanh(h.cumsum(1) / steps)
        return self.custom(h) if self.how == "custom" else self.head(h)


def shared_lm(how: str, seed: int = 14) -> nn.Module:
    torch.manual_seed(seed)
    model = SharedLM(how)
    model = finish(model, 0.5, frozen=() if how == "tied_head" else ("head",), pad_rows=(model.embed,))
    if how == "custom":
        model.custom.scale.requires_grad_(False)
    return model


def test_tied_head():
    used = check_rule(RuleCase(shared_lm("tied_head"), seed=5))
    assert used[("pairwise_ghost", "merged")] == {"embed+head": "pairwise_ghost"}
    assert used[("reduced_ghost", "merged")] == {"embed+head": "reduced_ghost"}


def test_two_lookups_share_a_table():
    used = check_rule(RuleCase(shared_lm("two_lookups"), seed=6, vocab=12))
    assert used[("pairwise_ghost", "merged")] == {"embed+lookup2": "pairwise_ghost"}
    assert used[("auto", "merged")] == {"embed+lookup2": "reduced_ghost"}


def test_module_called_twice():
    used = check_rule(RuleCase(shared_lm("called_twice"), seed=7, vocab=12))
    assert all(b == {"embed": "reduced_ghost"} for b in used.values()), used


def test_custom_rule_in_a_tied_group():
    register()
    used = check_rule(RuleCase(shared_lm("custom"), seed=8, scored_types=SCORED_TYPES))
    assert all(b == {"embed+custom": "reduced_ghost"} for b in used.values()), used


def test_ghostable_reads_declared_forms():
    from drpost.layers import scored_rule_for, tied

    emb, head = nn.Embedding(8, 4), nn.Linear(4, 8, bias=False)
    assert tied.ghostable([scored_rule_for(emb), scored_rule_for(head)])
    assert not tied.ghostable([scored_rule_for(emb), scored_rule_for(nn.Linear(4, 8))])   # biased head
    register()
    assert not tied.ghostable([scored_rule_for(emb), scored_rule_for(ScaledLinear(4, 8))])
