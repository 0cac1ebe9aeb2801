"""A custom per-token loss (what RL needs) goes through the same selection math: checked against
per-sample backward passes of the same weighted loss, with an extra batch key that must survive
the merged batch."""
import pytest
import torch
import torch.nn.functional as F

import models_tiny
from drpost import DataRegularizer


def weighted_ce(logits, batch):
    """Per-token CE times a per-token weight taken from the batch (like an advantage)."""
    labels = batch["labels"][:, 1:]
    lg = logits[:, :-1]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=-100,
                         reduction="none").view(labels.shape)
    return ce * batch["token_weights"][:, 1:], labels != -100


def make_batch(n, t, gen):
    ids = torch.randint(3, models_tiny.VOCAB, (n, t), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    mask = torch.ones_like(ids)
    mask[0, t - 2:] = 0
    labels[0, t - 2:] = -100
    weights = torch.rand(n, t, generator=gen, dtype=torch.float64) * 2 - 0.5
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_weights": weights}


def per_sample_grads(model, batch):
    out = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits
        losses, mask = weighted_ce(logits, row)
        (losses * mask).sum().backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("strategy", ["merged", "separate"])
def test_custom_loss_fn_matches_oracle(strategy):
    gen = torch.Generator().manual_seed(3)
    model = models_tiny.llama(tied=False)
    general, target = make_batch(5, 9, gen), make_batch(2, 7, gen)
    g_rows, t_rows = per_sample_grads(model, general), per_sample_grads(model, target)
    tokens = (general["labels"][:, 1:] != -100).sum(1).double()
    t_total = (target["labels"][:, 1:] != -100).sum().double()
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.6, scoring="reduced_ghost",
                          target_strategy=strategy, loss_fn=weighted_ce)
    reg.backward(general, target)
    params = dict(model.named_parameters())
    for module_name, mask in reg.last_masks.items():
        names = [n for n in params if n.rsplit(".", 1)[0] == module_name]
        g_t = {n: sum(r[n] for r in t_rows) / t_total for n in names}
        expected_scores = torch.stack([sum((r[n] * g_t[n]).sum() for n in names) for r in g_rows])
        torch.testing.assert_close(reg.last_scores[module_name], expected_scores, rtol=1e-6, atol=1e-12)
        chosen = [i for i in range(5) if mask[i]]
        for n in names:
            expected = sum(g_rows[i][n] for i in chosen) / tokens[chosen].sum()
            torch.testing.assert_close(params[n].grad, expected, rtol=1e-6, atol=1e-12)
    reg.detach()


def test_loss_fn_with_wrong_shapes_is_rejected():
    gen = torch.Generator().manual_seed(4)
    model = models_tiny.llama(tied=False)
    reg = DataRegularizer(model, loss_fn=lambda logits, batch: (logits[:, :, 0], batch["labels"][:, :3] != -100))
    with pytest.raises(ValueError, match="loss_fn"):
        reg.backward(make_batch(3, 8, gen), make_batch(1, 8, gen))


@pytest.mark.parametrize("fset,scoring", [("random", "reduced_ghost"), ("layerwise", "pairwise_ghost"),
                                          ("layerwise", "sketch"), ("layerwise", "auto")])
def test_state_dict_resumes_identically(fset, scoring):
    """A regularizer restored from state_dict() continues exactly like the original: same random
    subsets, same cached (separate-strategy) target gradient, same refresh schedule."""
    gen = torch.Generator().manual_seed(5)
    batches = [make_batch(4, 8, gen) for _ in range(4)]
    target = make_batch(2, 8, gen)

    def run(model, reg, steps):
        out = []
        for i in steps:
            model.zero_grad(set_to_none=True)
            reg.backward(batches[i], target if i % 3 == 0 else None)
            out.append(({k: v.clone() for k, v in reg.last_masks.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
        return out

    kw = dict(feasible_set=fset, scoring=scoring, target_strategy="separate", refresh_every=3, seed=7)
    model = models_tiny.llama(tied=False)
    reference = run(model, DataRegularizer(model, **kw), range(4))
    model2 = models_tiny.llama(tied=False)
    first = DataRegularizer(model2, **kw)
    run(model2, first, range(2))
    state = first.state_dict()
    first.detach()
    resumed = DataRegularizer(model2, **kw)
    resumed.load_state_dict(state)
    for (m_ref, g_ref), (m_new, g_new) in zip(reference[2:], run(model2, resumed, range(2, 4))):
        assert m_ref.keys() == m_new.keys()
        for k in m_ref:
            assert torch.equal(m_ref[k], m_new[k])
        for n in g_ref:
            torch.testing.assert_close(g_new[n], g_ref[n], rtol=0, atol=0)
