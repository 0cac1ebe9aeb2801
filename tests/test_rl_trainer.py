"""The policy-gradient loop (GRPO/RLOO, drpost feasible sets, IIF), rewards, advantages and the
errors users hit. Rollouts come from a deterministic fake sampler on a tiny float64 Llama, so the
real trainer code (rewards, log-probs, reference policy, target capture, updates) runs."""
import copy
import math

import pytest
import torch

import models_tiny
from drpost import DataRegularizer
from drpost import feasible as fs
from drpost.rl import grpo
from drpost.rl.grpo import PolicyGradientConfig, PolicyGradientTrainer
from drpost.rl.rewards import RewardError, call_rewards, group_advantages, rloo_advantages, zscore_rewards
from drpost.rl.rollout import build_rows
from rl_fakes import Tok, fake_sample, prompt_rows


def parity_reward(prompts, completions, answer, **_):
    """1 if the first completion id has the prompt's parity, else 0 (a verifiable 0/1 reward)."""
    return [float(int(c.split()[0]) % 2 == a) for c, a in zip(completions, answer)]


@pytest.fixture
def fake_rollouts(monkeypatch):
    monkeypatch.setattr(grpo, "sample", fake_sample)


def make(cfg_kw, model=None, reward=parity_reward, target=8):
    kw = dict(prompts_per_step=3, group_size=4, micro_batch=5, max_new_tokens=4, lr=1e-2, beta=0.05,
              target_batch=2, scoring="reduced_ghost")
    kw.update(cfg_kw)
    model = model or models_tiny.llama(tied=False)
    return PolicyGradientTrainer(model, Tok(), reward, PolicyGradientConfig(**kw), prompt_rows(12, 1),
                                 prompt_rows(target, 2))


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_filter_keeping_everything_equals_plain_step_for_step(fake_rollouts, algorithm):
    """filter with a drop share that rounds to zero keeps every completion although its scores have
    mixed signs: three steps (epochs 2, 2 mini-batches, micro-batches of 5) equal plain GRPO/RLOO."""
    base = models_tiny.llama(tied=False)
    common = dict(algorithm=algorithm, epochs=2, mini_batches=2)
    plain, filt = make({**common, "feasible_set": "standard"}, copy.deepcopy(base)), \
        make({**common, "feasible_set": "filter", "frac": 1e-6}, copy.deepcopy(base))
    signs = set()
    for _ in range(3):
        a, b = plain.step(), filt.step()
        assert a["reward"] == b["reward"] and b["kept"] == 1.0
        signs |= {float(torch.sign(s).min()) for s in filt.engine.last_scores.values()}
        pa, pb = params(plain.model), params(filt.model)
        for n in pa:
            torch.testing.assert_close(pb[n], pa[n], rtol=1e-9, atol=1e-12)
    assert -1.0 in signs, "the scores should include negative ones"
    assert pa and any(not torch.equal(pa[n], params(base)[n]) for n in pa)


@pytest.mark.parametrize("target_loss,algorithm", [("reward", "grpo"), ("train-loss", "grpo"), ("train-loss", "rloo")])
def test_filter_drops_and_statistics_cover_the_whole_rollout(fake_rollouts, target_loss, algorithm):
    tr = make({"feasible_set": "filter", "frac": 1.0, "scope": "global", "target_loss": target_loss,
               "algorithm": algorithm})
    log = tr.step()
    ro = tr.last_rollout
    rewards = parity_reward(ro.prompts, ro.completions, ro.columns["answer"])
    assert log["reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert 0.0 <= log["kept"] <= 1.0 and math.isfinite(log["kl"]) and log["kl"] >= 0
    for key in ("target_reward", "pg_loss", "grad_norm", "completion_tokens", "zero_std_groups"):
        assert key in log


def test_iif_scores_the_whole_rollout_once_and_reports_all_of_it(fake_rollouts, monkeypatch):
    tr = make({"feasible_set": "standard", "iif": True, "frac": 1.0, "target_source": "self"})
    seen = {}
    original = tr._iif_keep

    def spy(rows):
        keep = original(rows)
        seen["rows"], seen["keep"] = {k: v.clone() for k, v in rows.items()}, keep
        return keep
    monkeypatch.setattr(tr, "_iif_keep", spy)
    log = tr.step()
    ro = tr.last_rollout
    rewards = parity_reward(ro.prompts, ro.completions, ro.columns["answer"])
    # statistics over the whole rollout (METHOD §9.7), not over the kept completions
    assert log["reward"] == pytest.approx(sum(rewards) / len(rewards))
    keep = seen["keep"]
    assert log["kept"] == pytest.approx(float(keep.double().mean()))
    assert 0 < int(keep.sum()) < keep.numel(), "the seed should give a partial IIF selection"
    # the chunked scoring pass equals one global scoring of the whole rollout against the
    # pre-update policy (a fresh copy of the initial model)
    target = {k: seen["rows"][k] for k in ("input_ids", "attention_mask", "labels")}
    target["advantages"] = zscore_rewards(torch.tensor(rewards, dtype=torch.float64))
    fresh = make({"feasible_set": "standard", "iif": True, "frac": 1.0, "target_source": "self"})
    reg = DataRegularizer(fresh.model, feasible_set="filter", frac=1.0, scoring="reduced_ghost", scope="global",
                          target_strategy="separate", loss_fn=fresh.loss)
    reg.capture_target(target, chunk_size=5)
    reg.backward(seen["rows"])
    assert torch.equal(fs.filter_mask(reg.last_global_scores, 1.0), keep)
    reg.detach()


def test_target_pool_smaller_than_target_batch_is_an_error():
    with pytest.raises(ValueError, match="target pool has 1 prompts, fewer than target_batch=2"):
        make({"feasible_set": "filter"}, target=1)
    make({"feasible_set": "filter", "target_source": "self"}, target=1)   # no pool needed
    make({"feasible_set": "standard"}, target=1)                          # plain GRPO needs no target


@pytest.mark.parametrize("bad,match", [
    (lambda prompts, completions, **_: 1 / 0, "raised ZeroDivisionError"),
    (lambda prompts, completions, **_: [float("nan")] * len(completions), "returned nan for completion 0"),
    (lambda prompts, completions, **_: [1.0], "returned 1 values for 12 completions"),
    (lambda prompts, completions, **_: ["yes"] * len(completions), "rewards must be numbers"),
])
def test_bad_reward_functions_give_clear_errors(fake_rollouts, bad, match):
    tr = make({"feasible_set": "standard"}, reward=bad)
    with pytest.raises(RewardError, match=match):
        tr.step()


def test_empty_completions_and_prompts_are_rejected():
    with pytest.raises(ValueError, match="completion 1 is empty"):
        build_rows([[5, 6], [5, 6]], [[7], []], 0)
    with pytest.raises(ValueError, match="no completions"):
        build_rows([], [], 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        PolicyGradientConfig(max_new_tokens=0).check()


def test_call_rewards_sums_weighted_functions():
    def one(prompts, completions, **_):
        return [1.0] * len(completions)
    total, means = call_rewards([one, parity_reward], ["a", "b"], ["3", "4"], [2.0, 1.0], answer=[1, 1])
    assert total.tolist() == [3.0, 2.0] and means == {"one": 1.0, "parity_reward": 0.5}


def test_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    a = group_advantages(r, 4)
    g = r[:4]
    torch.testing.assert_close(a[:4], (g - g.mean()) / (g.std() + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4, dtype=torch.float64))      # zero-variance group: no signal
    loo = rloo_advantages(r, 4)
    assert loo[1] == pytest.approx(0.0 - 1.0) and loo[0] == pytest.approx(1.0 - 2.0 / 3)
    z = zscore_rewards(torch.tensor([0.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(z, torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=torch.float64))
    assert zscore_rewards(torch.ones(4)).tolist() == [0.5] * 4          # zero-variance fallback r - 0.5
    assert zscore_rewards(torch.zeros(4)).tolist() == [-0.5] * 4
    with pytest.raises(ValueError, match="RLOO needs at least 2"):
        rloo_advantages(r, 1)
