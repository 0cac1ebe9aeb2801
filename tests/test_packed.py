"""Packed (padding-free) batches: a sample is one sequence of a packed row.

Oracle: the same sequences padded one per row (with an attention mask) give the same gradients,
the same per-layer selections and the same token statistics, in float64 on a tiny sdpa Llama.
"""
from __future__ import annotations

import pytest
import torch

import models_tiny as mt
import oracles as O
from conftest import import_engine

TIGHT = 1e-9
LENGTHS_G = [[5, 3, 6], [4, 7]]          # general: 5 sequences in 2 packed rows
LENGTHS_T = [[4, 6], [5]]                # target: 3 sequences in 2 packed rows


def _seqs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, mt.VOCAB, (n,), generator=g) for row in lengths for n in row]


def packed_batch(lengths, seed, flash=False):
    """As TRL's padding_free collator emits it: position_ids restart, labels -100 at every start."""
    seqs, it = _seqs(lengths, seed), 0
    t = max(sum(r) for r in lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    pos = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, row in enumerate(lengths):
        at = 0
        for n in row:
            s = seqs[it]
            it += 1
            ids[r, at:at + n], labels[r, at:at + n] = s, s
            labels[r, at] = -100
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(at, t) - at + (pos[r, at - 1] + 1)   # trailing pad continues the last sequence
    out = {"input_ids": ids, "position_ids": pos, "labels": labels}
    if flash:
        starts = [r * t + a for r, row in enumerate(lengths) for a in [sum(row[:i]) for i in range(len(row))]]
        cu = torch.tensor(starts + [len(lengths) * t], dtype=torch.int32)
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(cu.diff().max()),
                   max_length_k=int(cu.diff().max()))
    return out


def padded_batch(lengths, seed):
    seqs = _seqs(lengths, seed)
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(s)] = s, 1, s
        labels[i, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(batches, feasible, **kw):
    DataRegularizer = import_engine()
    model = mt.llama(num_layers=2, seed=3)
    reg = DataRegularizer(model, feasible_set=feasible, frac=kw.pop("frac", 0.5), **kw)
    stats = reg.backward(*batches)
    out = (O.grads_of(model), {n: m.detach().clone() for n, m in reg.last_masks.items()}, stats.to_dict())
    reg.detach()
    return out


def agree(a, b):
    ga, ma, sa = a
    gb, mb, sb = b
    assert set(ga) == set(gb)
    for n in ga:
        if ga[n] is None or gb[n] is None:
            assert ga[n] is None and gb[n] is None, n
            continue
        O.assert_close(ga[n], gb[n], n, TIGHT)
    assert ma.keys() == mb.keys()
    for n in ma:
        assert torch.equal(ma[n], mb[n]), n
    for k in ("general_tokens", "target_tokens", "general_loss", "target_loss"):
        assert (sa[k] is None) == (sb[k] is None), k
        if sa[k] is not None:
            assert abs(sa[k] - sb[k]) <= 1e-9 * max(1.0, abs(sb[k])), (k, sa[k], sb[k])


CASES = [("layerwise", "layer", "auto"), ("layerwise", "layer", "sketch"), ("global", "layer", "auto"),
         ("filter", "layer", "auto"), ("rowwise", "layer", "auto"), ("layerwise", "global", "auto")]


@pytest.mark.parametrize("strategy", ["merged", "separate"])
@pytest.mark.parametrize("feasible,scope,scoring", CASES)
def test_packed_equals_padded(feasible, scope, scoring, strategy):
    kw = dict(scope=scope, scoring=scoring, target_strategy=strategy)
    packed = run((packed_batch(LENGTHS_G, 1), packed_batch(LENGTHS_T, 2)), feasible, **kw)
    padded = run((padded_batch(LENGTHS_G, 1), padded_batch(LENGTHS_T, 2)), feasible, **kw)
    assert all(m.shape[0] == 5 for m in padded[1].values())     # selections are over the 5 sequences
    agree(packed, padded)


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_packed_general_padded_target(strategy):
    kw = dict(target_strategy=strategy)
    mixed = run((packed_batch(LENGTHS_G, 1), padded_batch(LENGTHS_T, 2)), "layerwise", **kw)
    padded = run((padded_batch(LENGTHS_G, 1), padded_batch(LENGTHS_T, 2)), "layerwise", **kw)
    agree(mixed, padded)


@pytest.mark.parametrize("feasible", ["standard", "target_only"])
def test_plain_passes(feasible):
    packed = run((packed_batch(LENGTHS_G, 1), packed_batch(LENGTHS_T, 2)), feasible)
    padded = run((padded_batch(LENGTHS_G, 1), padded_batch(LENGTHS_T, 2)), feasible)
    agree(packed, padded)


def test_without_packing_awareness_the_gradient_differs():
    """The oracle can fail: a packed row forwarded without its position_ids is one long sequence."""
    b = packed_batch(LENGTHS_G, 1)
    del b["position_ids"]
    plain = run((b, None), "standard")
    padded = run((padded_batch(LENGTHS_G, 1), None), "standard")
    name = next(n for n, g in padded[0].items() if g is not None)
    assert float((plain[0][name] - padded[0][name]).abs().max()) > 1e-3


class Recorder(torch.nn.Module):
    """A model whose forward records its keyword arguments (flash kwargs cannot run on CPU)."""

    def __init__(self):
        super().__init__()
        self.inner = mt.llama(num_layers=1, seed=3)
        self.seen = []

    def forward(self, input_ids, position_ids=None, attention_mask=None, **kwargs):
        self.seen.append(sorted(kwargs) + (["position_ids"] if position_ids is not None else []))
        self.cu = kwargs.get("cu_seq_lens_q")
        return self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=kwargs.get("use_cache"))


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_flash_kwargs_pass_and_define_the_samples(strategy):
    DataRegularizer = import_engine()
    model = Recorder()
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, target_strategy=strategy)
    general = packed_batch(LENGTHS_G, 1, flash=True)
    reg.backward(general, packed_batch(LENGTHS_T, 2, flash=True))
    if strategy == "merged":   # rebuilt over the 4 merged rows: 5 general + 3 target sequences
        assert model.cu.numel() == 5 + 3 + 1 and int(model.cu[-1]) == 4 * general["input_ids"].shape[1]
    assert all(set(s) >= {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"}
               for s in model.seen)
    assert all(m.shape[0] == 5 for m in reg.last_masks.values())
    # cu_seq_lens alone define the boundaries (position_ids here never restart)
    only_cu = dict(general, position_ids=torch.arange(general["input_ids"].shape[1]).expand_as(general["input_ids"]))
    from drpost.packing import layout_of
    assert layout_of(only_cu).n == 5 and layout_of(general).n == 5
    reg.detach()


def test_errors():
    DataRegularizer = import_engine()
    model = mt.llama(num_layers=1, seed=3)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5)
    target = padded_batch(LENGTHS_T, 2)
    b = packed_batch(LENGTHS_G, 1)
    with pytest.raises(ValueError, match="attention_mask"):
        reg.backward(dict(b, attention_mask=torch.ones_like(b["input_ids"])), target)
    with pytest.raises(ValueError, match="cannot be merged row-wise"):
        reg.backward(dict(b, token_type_ids=torch.zeros(3)), dict(target, token_type_ids=torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="only one of"):
        reg.backward(dict(b, token_type_ids=torch.zeros_like(b["input_ids"])), target)
    left = padded_batch(LENGTHS_T, 2)
    left["attention_mask"] = left["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        reg.backward(b, left)
    reg.detach()

    class NoPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(mt.VOCAB, 8), torch.nn.Linear(8, mt.VOCAB)

        def forward(self, input_ids, attention_mask=None):
            return self.out(self.emb(input_ids))

    b2 = {k: b[k] for k in ("input_ids", "labels", "position_ids")}
    reg = DataRegularizer(NoPositions().double(), feasible_set="layerwise", frac=0.5, target_strategy="separate")
    with pytest.raises(ValueError, match="takes no position_ids"):
        reg.backward(b2, padded_batch(LENGTHS_T, 2))
    reg.detach()


def test_supervised_sequence_start_is_masked_with_a_warning():
    b = packed_batch(LENGTHS_G, 1)
    b["labels"] = torch.where(b["position_ids"] == 0, b["input_ids"], b["labels"])
    b["labels"][:, 0] = -100
    import drpost.batch as B
    B._warned_boundary.clear()
    with pytest.warns(UserWarning, match="first token of a sequence"):
        got = run((b, None), "standard")
    agree(got, run((padded_batch(LENGTHS_G, 1), None), "standard"))


def test_trl_padding_free_collator():
    trl = pytest.importorskip("trl.trainer.sft_trainer")
    collate = trl.DataCollatorForLanguageModeling(pad_token_id=mt.PAD_ID, padding_free=True)
    seqs = _seqs([[5, 3, 6, 4]], 1)
    batch = collate([{"input_ids": s.tolist()} for s in seqs])
    assert "attention_mask" not in batch
    rows = [[len(s) for s in seqs]]
    padded = padded_batch(rows, 1)
    assert {"position_ids", "cu_seq_lens_q", "max_length_q"} <= set(batch)
    got = run((batch, padded_batch(LENGTHS_T, 2)), "layerwise", target_strategy="merged")
    agree(got, run((padded, padded_batch(LENGTHS_T, 2)), "layerwise", target_strategy="merged"))


def test_capture_target_in_chunks():
    """Separate strategy, the target captured in chunks of one packed row (layouts per chunk)."""
    DataRegularizer = import_engine()
    out = []
    for general, target in ((packed_batch(LENGTHS_G, 1), packed_batch(LENGTHS_T, 2)),
                            (padded_batch(LENGTHS_G, 1), padded_batch(LENGTHS_T, 2))):
        model = mt.llama(num_layers=2, seed=3)
        reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, target_strategy="separate")
        reg.capture_target(target, chunk_size=1)
        stats = reg.backward(general)
        out.append((O.grads_of(model), {n: m.clone() for n, m in reg.last_masks.items()}, stats.to_dict()))
        reg.detach()
    agree(*out)


def test_unpacked_layout_is_the_identity():
    from drpost.packing import layout_of
    b = padded_batch(LENGTHS_G, 1)
    x = torch.randn(5, b["input_ids"].shape[1], 3)
    lay = layout_of(b)
    assert lay.identity and lay.samples(x) is x
    b["position_ids"] = torch.arange(b["input_ids"].shape[1]).expand(5, -1)
    assert layout_of(b).identity


@pytest.mark.parametrize("pad_positions", ["zeros", "restart_run"])
def test_trailing_padding_of_packed_rows_is_not_a_sample(pad_positions):
    """Packed rows padded to one length, the pads' position_ids all 0 (each pad token a restart) or one
    restarting run 0, 1, 2, ...: still 5 samples, the gradients and selections of the padded oracle."""
    from drpost.packing import layout_of

    b = packed_batch(LENGTHS_G, 1)
    pad = 4
    n, t = b["input_ids"].shape
    b["input_ids"] = torch.cat([b["input_ids"], torch.zeros(n, pad, dtype=torch.long)], 1)
    b["labels"] = torch.cat([b["labels"], torch.full((n, pad), -100)], 1)
    tail = torch.zeros(n, pad, dtype=torch.long) if pad_positions == "zeros" else torch.arange(pad).expand(n, pad)
    b["position_ids"] = torch.cat([b["position_ids"], tail], 1)
    assert layout_of(b).n == 5
    got = run((b, packed_batch(LENGTHS_T, 2)), "layerwise")
    agree(got, run((padded_batch(LENGTHS_G, 1), padded_batch(LENGTHS_T, 2)), "layerwise"))
    # a single sequence per row plus padding is an ordinary (identity) layout
    one = {"input_ids": torch.arange(3, 11).view(1, 8), "labels": torch.tensor([[-100, 4, 5, 6, 7, -100, -100, -100]]),
           "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 0, 0]])}
    assert layout_of(one).identity
    # a trailing sequence that has supervised tokens stays a sample of its own
    one["labels"][0, 7] = 10
    one["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    assert layout_of(one).n == 2
