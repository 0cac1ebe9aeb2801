"""The RL loss path against batch-size-1 oracles (float64, tiny Llama).

The oracle re-implements the clipped policy-gradient loss with the k3 KL term by hand
(log_softmax + gather, no drpost/TRL code), takes one backward per completion for the
per-sample gradients G_i (token sums), and forms the target gradient of the ``reward`` target
loss (z-weighted completion log-probs). The engine must reproduce the per-layer and global
scores <G_i, g_T> / T_target, the filter decisions and the renormalised update."""
import pytest
import torch

import models_tiny
from drpost import DataRegularizer
from drpost.rl.loss import PolicyLoss

EPS, BETA = 0.2, 0.1


def rl_batch(n, seq, seed, with_old=True, with_ref=True):
    b = models_tiny.make_batch(n, seq, seed)
    g = torch.Generator().manual_seed(seed + 1)
    b["advantages"] = torch.randn(n, generator=g, dtype=torch.float64)
    if with_old or with_ref:
        model = models_tiny.llama(tied=False)
        with torch.no_grad():
            lp = _hand_logps(model, b)
        if with_old:     # ratios spread around 1 so that some tokens are clipped
            b["old_logps"] = lp + 0.4 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
        if with_ref:
            b["ref_logps"] = lp + 0.5 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
    return b


def _hand_logps(model, batch):
    """[N, L] log-prob of labels[:, j+1] at position j (0 where unlabelled), by hand."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    out = torch.zeros(labels.shape, dtype=logits.dtype)
    lsm = torch.log_softmax(logits[:, :-1], -1)
    nxt = labels[:, 1:]
    got = lsm.gather(-1, nxt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    out[:, :-1] = torch.where(nxt != -100, got, torch.zeros_like(got))
    return out


def hand_row_loss(model, row, beta):
    """Sum over the completion tokens of -min(rho A, clip(rho) A) + beta k3(ref, pi)."""
    lp = _hand_logps(model, row)[:, :-1]
    mask = row["labels"][:, 1:] != -100
    a = row["advantages"].view(-1, 1)
    total = 0.0
    old = row.get("old_logps")
    rho = torch.exp(lp - (old[:, :-1] if old is not None else lp.detach()))
    surrogate = -torch.minimum(rho * a, torch.clamp(rho, 1 - EPS, 1 + EPS) * a)
    total = surrogate
    if row.get("ref_logps") is not None and beta > 0:
        q = row["ref_logps"][:, :-1] - lp
        total = total + beta * (torch.exp(q) - q - 1)
    return (total * mask).sum()


def per_sample(model, batch, beta):
    out = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        hand_row_loss(model, row, beta).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return out


def test_policy_loss_values_match_the_hand_formula():
    model = models_tiny.llama(tied=False)
    batch = rl_batch(4, 9, seed=1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses, mask = PolicyLoss(EPS, BETA)(logits, batch)
    assert torch.equal(mask, torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100)
    for i in range(4):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(losses[i].sum(), hand_row_loss(model, row, BETA), rtol=1e-12, atol=1e-12)
    # the clipping is exercised: some ratios are outside [1 - eps, 1 + eps]
    lp = _hand_logps(model, batch)
    rho = torch.exp(lp - batch["old_logps"])[:, :-1][batch["labels"][:, 1:] != -100]
    assert ((rho < 1 - EPS) | (rho > 1 + EPS)).any() and ((rho > 1 - EPS) & (rho < 1 + EPS)).any()


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_pg_scores_selection_and_update_match_batch_size_one_oracle(scope, beta):
    model = models_tiny.llama(tied=False)
    general = rl_batch(6, 10, seed=3)
    target = rl_batch(3, 8, seed=3, with_old=False, with_ref=False)   # `reward` target: z-weights only
    g_rows, t_rows = per_sample(model, general, beta), per_sample(model, target, 0.0)
    tokens = (general["labels"][:, 1:] != -100).sum(1).double()
    t_total = (target["labels"][:, 1:] != -100).sum().double()
    reg = DataRegularizer(model, feasible_set="filter", frac=1.0, scoring="reduced_ghost", scope=scope, target_strategy="separate",
                          loss_fn=PolicyLoss(EPS, beta))
    reg.capture_target(target)
    reg.backward(general)
    params = dict(model.named_parameters())
    total = torch.zeros(6, dtype=torch.float64)
    for module_name, scores in reg.last_scores.items():
        names = [n for n in params if n.rsplit(".", 1)[0] == module_name and params[n].requires_grad]
        g_t = {n: sum(r[n] for r in t_rows) / t_total for n in names}
        expected = torch.stack([sum((r[n] * g_t[n]).sum() for n in names) for r in g_rows])
        torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-12)
        total += expected
        if scope == "layer":
            chosen = [i for i in range(6) if expected[i] >= 0]
            assert reg.last_masks[module_name].tolist() == [i in chosen for i in range(6)]
            for n in names:
                want = sum(g_rows[i][n] for i in chosen) / tokens[chosen].sum() if chosen else torch.zeros_like(
                    params[n])
                torch.testing.assert_close(params[n].grad, want, rtol=1e-6, atol=1e-12)
    if scope == "global":
        torch.testing.assert_close(reg.last_global_scores, total, rtol=1e-6, atol=1e-12)
        chosen = [i for i in range(6) if total[i] >= 0]
        assert 0 < len(chosen) < 6, "the test needs mixed-sign global scores"
        for n, p in params.items():
            if p.requires_grad and n.rsplit(".", 1)[0] in reg.last_scores:
                want = sum(g_rows[i][n] for i in chosen) / tokens[chosen].sum()
                torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-12)
    reg.detach()


def test_kl_term_and_advantages_change_the_scores():
    """Guards against an oracle that would pass whatever the loss: the KL term and the advantage
    signs each change the engine's scores."""
    def scores(beta, flip=False):
        model = models_tiny.llama(tied=False)
        general = rl_batch(4, 9, seed=4)
        if flip:
            general["advantages"] = -general["advantages"]
        reg = DataRegularizer(model, feasible_set="filter", frac=1.0, scoring="reduced_ghost", scope="global",
                              target_strategy="separate", loss_fn=PolicyLoss(EPS, beta))
        reg.capture_target(rl_batch(2, 8, seed=5, with_old=False, with_ref=False))
        reg.backward(general)
        s = reg.last_global_scores.clone()
        reg.detach()
        return s

    base = scores(BETA)
    assert not torch.allclose(base, scores(0.0), rtol=1e-3)
    assert not torch.allclose(base, scores(BETA, flip=True), rtol=1e-3)


def test_filter_with_every_score_nonnegative_equals_plain_grpo_step_for_step():
    """One completion per micro-batch, each scored against itself as target (score = |G_i|^2 / T_i
    >= 0): the filter keeps everything, and three AdamW steps of 3 accumulated micro-batches equal
    plain GRPO (the 'standard' feasible set) step for step."""
    batches = [rl_batch(3, 9, seed=10 + s) for s in range(3)]

    def run(filtered):
        model = models_tiny.llama(tied=False)
        fset = "filter" if filtered else "standard"
        reg = DataRegularizer(model, feasible_set=fset, frac=1.0, scoring="reduced_ghost", target_strategy="separate",
                              loss_fn=PolicyLoss(EPS, BETA), refresh_every=10 ** 9)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        trace = []
        for batch in batches:
            for i in range(3):
                row = {k: v[i:i + 1] for k, v in batch.items()}
                if filtered:
                    reg.capture_target(row)
                stats = reg.backward(row, finalize=i == 2)
                if filtered:
                    assert all(float(s.min()) >= 0 for s in reg.last_scores.values())
                    assert all(float(v) == 1 for v in stats.selected.values())
            opt.step()
            opt.zero_grad(set_to_none=True)
            trace.append({n: p.detach().clone() for n, p in model.named_parameters()})
        reg.detach()
        return trace

    for a, b in zip(run(True), run(False)):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12)
