"""PPO for RLHF (drpost.rl.ppo): GAE/whitening against naive loops, the PPO step against a
hand-written PPO with plain autograd (standard, a filter that keeps everything, a selecting
filter, IIF), an end-to-end run with real sampling, and the errors users hit. Rollouts of the
oracle tests come from a deterministic fake sampler on tiny float64 Llamas, so the real trainer
code (rewards, log-probs, reference, critic, target capture, updates) runs."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import models_tiny
from drpost.engine.options import OptionError
from drpost.rl import grpo, ppo
from drpost.rl.ppo import PPOConfig, PPOTrainer, gae, token_rewards, value_model_from_causal_lm, whiten
from drpost.rl.rewards import RewardError, zscore_rewards
from drpost.rl.rollout import build_rows
from rl_fakes import Tok, fake_sample, prompt_rows


# ---------------------------------------------------------------------------------------------- fixtures
def toy_reward(prompts, completions, answer, **_):
    """A graded score: how close the mean completion id is to a prompt-dependent value."""
    out = []
    for c, a in zip(completions, answer):
        ids = [int(t) for t in c.split()]
        out.append(1.0 - abs(sum(ids) / len(ids) / models_tiny.VOCAB - (0.25 + 0.5 * a)))
    return out


@pytest.fixture
def fake_rollouts(monkeypatch):
    monkeypatch.setattr(ppo, "sample", fake_sample)


def critic(seed=3):
    torch.manual_seed(seed)
    return value_model_from_causal_lm(models_tiny.llama(tied=False, seed=seed))


def make(cfg_kw, model=None, value_model=None, reward=toy_reward, target=8, ref_model=None):
    kw = dict(prompts_per_step=6, group_size=2, micro_batch=5, max_new_tokens=4, lr=1e-2, value_lr=1e-2, beta=0.05,
              target_batch=3, scoring="reduced_ghost", epochs=2, mini_batches=1, gamma=0.9, lam=0.8,
              clip_eps=0.1, cliprange_value=0.05, max_grad_norm=1.0, weight_decay=0.01)
    kw.update(cfg_kw)
    model = model or models_tiny.llama(tied=False)
    return PPOTrainer(model, Tok(), reward, PPOConfig(**kw), prompt_rows(12, 1), prompt_rows(target, 2),
                      value_model=critic() if value_model is None else value_model, ref_model=ref_model)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(a, b, rtol=1e-9, atol=1e-12):
    a, b = params(a), params(b)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- naive oracles
def naive_gae(rewards, values, mask, gamma, lam):
    """Per row, a plain Python loop backwards over its completion positions."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[i, t]]
        running = 0.0
        for k in reversed(range(len(pos))):
            t = pos[k]
            next_v = float(values[i, pos[k + 1]]) if k + 1 < len(pos) else 0.0
            delta = float(rewards[i, t]) + gamma * next_v - float(values[i, t])
            running = delta + gamma * lam * running
            adv[i, t] = running
    returns = torch.where(mask, adv + values.double(), torch.zeros_like(adv))
    return adv, returns


def naive_logps(model, rows):
    """log pi(y_t) at every position predicting a completion token (log_softmax + gather)."""
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    target = F.pad(rows["labels"][:, 1:], (0, 1), value=-100)
    mask = target != -100
    lp = torch.log_softmax(logits.double(), -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp)), mask


def naive_surrogate(new, old, adv, eps):
    ratio = torch.exp(new - old)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)


def oracle_ppo(policy, value, ref, rows, scores, c, keep=None, target=None, select=False):
    """Hand-written PPO on the whole rollout with plain autograd (float64): c.epochs optimiser steps
    (mini_batches=1). ``keep`` (IIF): train only on those rows, with the whole rollout's advantages.
    ``select``: the global filter of drpost, per sample: score_i = <G_i, g_T> (every trainable
    parameter is scored), drop the negatives (frac=1), the update is the kept samples' summed
    gradient over their token count; g_T from the ``reward`` target loss on ``target`` rows, or
    (``target=None``) from the ``train-loss`` target on the rollout itself."""
    pp = [p for p in policy.parameters() if p.requires_grad]
    vp = [p for p in value.parameters() if p.requires_grad]
    with torch.no_grad():
        old, mask = naive_logps(policy, rows)
        refl, _ = naive_logps(ref, rows)
        values = torch.where(mask, value(rows["input_ids"], rows["attention_mask"]).double(), torch.zeros_like(old))
    r = torch.where(mask, -c.beta * (old - refl), torch.zeros_like(old))
    for i in range(r.shape[0]):
        r[i, int(mask[i].nonzero().max())] += float(scores[i])
    adv, ret = naive_gae(r, values, mask, c.gamma, c.lam)
    a = adv[mask]
    adv = torch.where(mask, (adv - a.mean()) / torch.sqrt(a.var(unbiased=True) + 1e-8), torch.zeros_like(adv))
    if keep is not None:
        idx = keep.nonzero().flatten()
        rows = {k: v[idx] for k, v in rows.items()}
        old, mask, values, ret, adv = old[idx], mask[idx], values[idx], ret[idx], adv[idx]
    g_target = None
    if select and target is not None:     # the reward target loss: -sum_n z_n sum_t log pi(y_nt)
        lp, tm = naive_logps(policy, target)
        z = target["advantages"].double().view(-1, 1)
        g_target = torch.autograd.grad(-(z * lp)[tm].sum(), pp)
    elif select:                          # train-loss on the own rollout: the PPO objective at ratio 1
        lp, _ = naive_logps(policy, rows)
        g_target = torch.autograd.grad(-(adv * lp)[mask].sum(), pp)
    opt = torch.optim.AdamW(pp, lr=c.lr, weight_decay=c.weight_decay)
    vopt = torch.optim.AdamW(vp, lr=c.value_lr, weight_decay=c.weight_decay)
    dropped = 0
    for _ in range(c.epochs):
        if not select:
            new, _ = naive_logps(policy, rows)
            naive_surrogate(new, old, adv, c.clip_eps)[mask].mean().backward()
        else:
            acc, tokens = [torch.zeros_like(p) for p in pp], 0
            for i in range(rows["input_ids"].shape[0]):
                one = {k: v[i:i + 1] for k, v in rows.items()}
                new, m = naive_logps(policy, one)
                g = torch.autograd.grad(naive_surrogate(new, old[i:i + 1], adv[i:i + 1], c.clip_eps)[m].sum(), pp)
                if sum(float((gi * ti).sum()) for gi, ti in zip(g, g_target)) >= 0:
                    acc = [x + gi for x, gi in zip(acc, g)]
                    tokens += int(m.sum())
                else:
                    dropped += 1
            for p, x in zip(pp, acc):
                p.grad = x / max(tokens, 1)
        torch.nn.utils.clip_grad_norm_(pp, c.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        v = value(rows["input_ids"], rows["attention_mask"]).double()
        vc = values + torch.clamp(v - values, -c.cliprange_value, c.cliprange_value)
        vl = 0.5 * torch.maximum((v - ret) ** 2, (vc - ret) ** 2)[mask].mean()
        (c.vf_coef * vl).backward()
        torch.nn.utils.clip_grad_norm_(vp, c.max_grad_norm)
        vopt.step()
        vopt.zero_grad(set_to_none=True)
    return dropped


def rollout_rows(tr):
    ro = tr.last_rollout
    rows = build_rows(ro.prompt_ids, ro.completion_ids, models_tiny.PAD_ID)
    scores = torch.tensor(toy_reward(ro.prompts, ro.completions, ro.columns["answer"]), dtype=torch.float64)
    return rows, scores


# ---------------------------------------------------------------------------------------------- 1. GAE
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.5, 0.0), (0.0, 0.7)])
def test_gae_and_returns_equal_a_naive_backwards_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(5, 9, dtype=torch.bool)
    for i, (s, e) in enumerate([(2, 8), (0, 9), (4, 5), (3, 6), (1, 4)]):
        mask[i, s:e] = True
    mask[1, 4] = False                                   # a gap: GAE skips to the next completion position
    r = torch.randn(5, 9, generator=g, dtype=torch.float64)
    v = torch.randn(5, 9, generator=g, dtype=torch.float64)
    adv, ret = gae(r, v, mask, gamma, lam)
    nadv, nret = naive_gae(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, nadv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, nret, rtol=1e-12, atol=1e-12)
    assert bool((adv[~mask] == 0).all()) and bool((ret[~mask] == 0).all())
    if gamma == 1.0 and lam == 1.0:   # Monte Carlo: A_t = sum of the rewards from t on - V(s_t)
        i, pos = 0, list(range(2, 8))
        for t in pos:
            assert float(adv[i, t]) == pytest.approx(float(r[i, t:8].sum() - v[i, t]), abs=1e-12)


def test_whitening_and_token_rewards_as_documented():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.rand(4, 7, generator=g) > 0.4
    w = whiten(x, mask)
    sel = x[mask]
    torch.testing.assert_close(w[mask], (sel - sel.mean()) / torch.sqrt(sel.var(unbiased=True) + 1e-8))
    assert float(w[mask].mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(w[mask].std(unbiased=True)) == pytest.approx(1.0, abs=1e-6)
    assert bool((w[~mask] == 0).all())
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[0, 1] = True
    assert float(whiten(x[:2, :3], one).abs().sum()) == 0.0          # a single token: x - mean = 0
    # per-token rewards: -beta * (old - ref) on the completion, the score added at its last token
    old, ref = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    m = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    r = token_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), m, old, ref, beta=0.1)
    expect = torch.where(m, -0.1 * (old - ref), torch.zeros_like(old))
    expect[0, 3] += 2.0
    expect[1, 2] += -1.0
    torch.testing.assert_close(r, expect)
    with pytest.raises(ValueError, match="row 1 has no completion token"):
        token_rewards(torch.zeros(2, dtype=torch.float64), torch.tensor([[True], [False]]))


# ---------------------------------------------------------------------------------------------- 2. standard
def test_standard_ppo_step_equals_a_hand_written_ppo(fake_rollouts):
    """feasible_set='standard': one step (2 epochs = 2 optimiser steps over 12 rows in micro-batches
    of 5) equals PPO written out with plain autograd on the whole rollout, policy and critic. The
    reference policy differs from the policy, so the KL reward is not zero."""
    base, vbase, ref = models_tiny.llama(tied=False), critic(), models_tiny.llama(tied=False, seed=5)
    tr = make({"feasible_set": "standard"}, copy.deepcopy(base), copy.deepcopy(vbase), ref_model=copy.deepcopy(ref))
    log = tr.step()
    assert log["kept"] == 1.0 and all(math.isfinite(log[k]) for k in ("pg_loss", "value_loss", "kl", "reward"))
    assert abs(log["kl"]) > 1e-3
    assert log["clip_frac"] > 0, "the second epoch should clip some ratios (the test covers the clip)"
    rows, scores = rollout_rows(tr)
    assert log["reward"] == pytest.approx(float(scores.mean()))
    policy, value = copy.deepcopy(base), copy.deepcopy(vbase)
    oracle_ppo(policy, value, ref, rows, scores, tr.cfg)
    assert_params_equal(tr.model, policy)
    assert_params_equal(tr.value_model, value)
    assert any(not torch.equal(p, q) for p, q in zip(params(base).values(), params(tr.model).values()))


def test_filter_keeping_everything_equals_standard_step_for_step(fake_rollouts):
    """A filter whose drop share rounds to zero keeps every completion although its scores have mixed
    signs: two steps (2 epochs x 2 mini-batches, target refresh every step) equal plain PPO."""
    base, vbase = models_tiny.llama(tied=False), critic()
    common = dict(mini_batches=2, refresh_every=1)
    plain = make({**common, "feasible_set": "standard"}, copy.deepcopy(base), copy.deepcopy(vbase))
    filt = make({**common, "feasible_set": "filter", "frac": 1e-6}, copy.deepcopy(base), copy.deepcopy(vbase))
    signs = set()
    for _ in range(2):
        a, b = plain.step(), filt.step()
        assert a["reward"] == b["reward"] and b["kept"] == 1.0 and "target_reward" in b
        signs |= {float(torch.sign(s).min()) for s in filt.engine.last_scores.values()}
        assert_params_equal(filt.model, plain.model)
        assert_params_equal(filt.value_model, plain.value_model)
    assert -1.0 in signs, "the scores should include negative ones"


# ---------------------------------------------------------------------------------------------- 3. selection, IIF
def frozen_norms(model):
    for n, p in model.named_parameters():
        if "norm" in n:
            p.requires_grad_(False)     # every trainable parameter is then scored (no plain-autograd norms)
    return model


@pytest.mark.parametrize("target_loss,target_source", [("reward", "pool"), ("train-loss", "self")])
def test_selecting_filter_equals_the_oracle_on_the_kept_completions(fake_rollouts, monkeypatch, target_loss,
                                                                   target_source):
    """Global filter, frac=1 (drop every negatively scored completion), target = the z-scored
    reward loss on rollouts of target prompts, or the PPO objective on the step's own rollout:
    each micro-batch's selection and the resulting update equal a per-sample oracle
    (score = <G_i, g_T>, update = kept gradients / kept tokens); the critic trains on every row."""
    base, vbase = frozen_norms(models_tiny.llama(tied=False)), critic()
    tr = make({"feasible_set": "filter", "frac": 1.0, "scope": "global", "target_loss": target_loss,
               "target_source": target_source}, copy.deepcopy(base), copy.deepcopy(vbase))
    captured = {}
    original = tr._capture

    def spy(engine, target):
        captured["target"] = {k: v.clone() for k, v in target.items()}
        return original(engine, target)
    monkeypatch.setattr(tr, "_capture", spy)
    log = tr.step()
    assert 0.0 < log["kept"] < 1.0, "the seed should give a partial selection"
    rows, scores = rollout_rows(tr)
    target = None
    if target_source == "pool":
        target = captured["target"]
        assert target["input_ids"].shape[0] == tr.cfg.target_batch * tr.cfg.group_size
        torch.testing.assert_close(target["advantages"].double(),
                                   zscore_rewards(torch.tensor(log_target_scores(tr, target), dtype=torch.float64)))
    else:
        assert torch.equal(captured["target"]["input_ids"], rows["input_ids"])
    policy, value = copy.deepcopy(base), copy.deepcopy(vbase)
    dropped = oracle_ppo(policy, value, copy.deepcopy(base), rows, scores, tr.cfg, target=target, select=True)
    assert dropped > 0
    assert log["kept"] == pytest.approx(1 - dropped / (2 * rows["input_ids"].shape[0]))
    assert_params_equal(tr.model, policy)
    assert_params_equal(tr.value_model, value)    # the critic trains on every completion


def log_target_scores(tr, target):
    """The toy reward of the captured target rows (decoded as the fake sampler encodes completions)."""
    pool = {tuple(r["ids"]): r["answer"] for r in tr.target_prompts}   # fake prompts are their 4 ids
    texts, answers = [], []
    for ids, lab in zip(target["input_ids"].tolist(), target["labels"].tolist()):
        texts.append(" ".join(str(t) for t, y in zip(ids, lab) if y != -100))
        answers.append(pool[tuple(ids[:4])])
    return toy_reward(texts, texts, answers)


def test_iif_scores_the_rollout_once_and_trains_plain_ppo_on_the_kept(fake_rollouts, monkeypatch):
    base, vbase = frozen_norms(models_tiny.llama(tied=False)), critic()
    tr = make({"feasible_set": "standard", "iif": True, "frac": 1.0, "target_source": "self"},
              copy.deepcopy(base), copy.deepcopy(vbase))
    calls, seen = [], {}
    backward = tr.scorer.backward

    def count(batch, *a, **k):
        calls.append(batch["input_ids"].shape[0])
        return backward(batch, *a, **k)
    monkeypatch.setattr(tr.scorer, "backward", count)
    original = tr._iif_keep

    def spy(rows):
        seen["keep"] = original(rows)
        return seen["keep"]
    monkeypatch.setattr(tr, "_iif_keep", spy)
    log = tr.step()
    rows, scores = rollout_rows(tr)
    n = rows["input_ids"].shape[0]
    assert sum(calls) == n and len(calls) == math.ceil(n / tr.cfg.micro_batch), "one scoring pass over the rollout"
    keep = seen["keep"]
    assert 0 < int(keep.sum()) < n, "the seed should give a partial IIF selection"
    # statistics over the whole rollout (METHOD §9.7), not over the kept completions
    assert log["reward"] == pytest.approx(float(scores.mean()))
    assert log["kept"] == pytest.approx(float(keep.double().mean()))
    policy, value = copy.deepcopy(base), copy.deepcopy(vbase)
    oracle_ppo(policy, value, copy.deepcopy(base), rows, scores, tr.cfg, keep=keep)
    assert_params_equal(tr.model, policy)
    assert_params_equal(tr.value_model, value)


# ---------------------------------------------------------------------------------------------- 4. end to end, errors
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from drpost.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


def tiny_policy(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def vowel_reward(prompts, completions, **_):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


@pytest.mark.parametrize("method", [
    {"feasible_set": "filter", "scope": "layer", "reward_model": True},
    {"feasible_set": "layerwise", "frac": 0.5, "target_loss": "train-loss"},
    {"feasible_set": "standard", "iif": True},
])
def test_end_to_end_with_real_sampling(tokenizer, method):
    from drpost.rl.reward_model import RewardModelScorer, reward_model_from_causal_lm

    method = dict(method)
    reward = vowel_reward
    if method.pop("reward_model", False):   # a learned reward model (untrained: any scalar score will do)
        reward = RewardModelScorer(reward_model_from_causal_lm(tiny_policy(tokenizer, seed=9), lora_r=0), tokenizer)
    cfg = PPOConfig(prompts_per_step=3, group_size=2, micro_batch=4, max_new_tokens=5, target_batch=2, epochs=2,
                    mini_batches=2, lr=1e-3, value_lr=1e-2, refresh_every=2, **method)
    prompts = [{"prompt": f"Say something about topic {i}."} for i in range(6)]
    tr = PPOTrainer(tiny_policy(tokenizer), tokenizer, reward, cfg, prompts, prompts[:3])
    logs = [tr.step() for _ in range(3)]
    for log in logs:
        for key in ("reward", "kl", "value_loss", "value_mean", "returns_mean", "completion_tokens"):
            assert math.isfinite(log[key]), (key, log)
        assert 0.0 <= log["kept"] <= 1.0
        if log["kept"] > 0:
            assert math.isfinite(log["pg_loss"]) and math.isfinite(log["grad_norm"])
    assert "target_reward" in logs[0] and "target_reward" not in logs[1] and "target_reward" in logs[2]
    tr.close()


def test_the_critic_fits_the_returns_over_the_epochs(fake_rollouts):
    tr = make({"feasible_set": "standard", "epochs": 6, "value_lr": 3e-3, "cliprange_value": 10.0})
    log = tr.step()
    assert math.isfinite(log["value_loss_first"]) and log["value_loss_last"] < 0.7 * log["value_loss_first"]


@pytest.mark.parametrize("bad,match", [
    (lambda prompts, completions, **_: 1 / 0, "raised ZeroDivisionError"),
    (lambda prompts, completions, **_: [float("nan")] * len(completions), "returned nan for completion 0"),
    (lambda prompts, completions, **_: [1.0], "returned 1 values for 12 completions"),
])
def test_bad_reward_functions_give_clear_errors(fake_rollouts, bad, match):
    tr = make({"feasible_set": "standard"}, reward=bad)
    with pytest.raises(RewardError, match=match):
        tr.step()


def test_a_reward_model_returning_nan_is_a_clear_error(tokenizer):
    from drpost.rl.reward_model import RewardModelScorer, reward_model_from_causal_lm

    rm = reward_model_from_causal_lm(tiny_policy(tokenizer, seed=9), lora_r=0)
    with torch.no_grad():
        rm.head.bias.fill_(float("nan"))
    cfg = PPOConfig(feasible_set="standard", prompts_per_step=2, max_new_tokens=3)
    tr = PPOTrainer(tiny_policy(tokenizer), tokenizer, RewardModelScorer(rm, tokenizer), cfg,
                    [{"prompt": "Hello."}, {"prompt": "Hi."}])
    with pytest.raises(RewardError, match="reward function 'reward_model' returned nan for completion 0"):
        tr.step()


def test_a_value_model_returning_nan_is_a_clear_error(fake_rollouts):
    v = critic()
    with torch.no_grad():
        v.head.bias.fill_(float("inf"))
    tr = make({"feasible_set": "standard"}, value_model=v)
    with pytest.raises(FloatingPointError, match="value model returned non-finite values"):
        tr.step()


def test_a_critic_sharing_the_policy_parameters_is_refused():
    from drpost.rl.ppo import ValueModel

    policy = models_tiny.llama(tied=False)
    with pytest.raises(ValueError, match="value model shares parameters with the policy"):
        make({"feasible_set": "standard"}, policy, ValueModel(policy.model, 16))


def test_target_pool_smaller_than_target_batch_is_an_error():
    with pytest.raises(ValueError, match="target pool has 2 prompts, fewer than target_batch=3"):
        make({"feasible_set": "filter"}, target=2)
    with pytest.raises(ValueError, match="target pool has 2 prompts, fewer than target_batch=3"):
        make({"feasible_set": "standard", "iif": True}, target=2)
    make({"feasible_set": "filter", "target_source": "self"}, target=2)   # no pool needed
    make({"feasible_set": "standard"}, target=2)                          # plain PPO needs no target


@pytest.mark.parametrize("field,value,match", [
    ("gamma", 1.5, r"gamma must be a number in \[0.0, 1.0\]"),
    ("gamma", float("nan"), "gamma must be a number"),
    ("lam", -0.1, r"lam must be a number in \[0.0, 1.0\]"),
    ("clip_eps", 0.0, "clip_eps must be > 0"),
    ("clip_eps", 1.5, r"clip_eps must be in \(0, 1\)"),
    ("cliprange_value", 0.0, "cliprange_value must be a finite number > 0"),
    ("vf_coef", -1.0, "vf_coef must be a finite number > 0"),
    ("value_lr", float("inf"), "value_lr must be a finite number > 0"),
    ("algorithm", "grpo", "PPOConfig.algorithm must be 'ppo'"),
    ("feasible_set", "layerwise_typo", "feasible_set"),
])
def test_invalid_config_values_are_clear_errors(field, value, match):
    with pytest.raises((OptionError, ValueError), match=match):
        PPOConfig(**{field: value})


def test_empty_prompts_are_rejected():
    cfg = PPOConfig(feasible_set="standard")
    with pytest.raises(ValueError, match="train_prompts is empty"):
        PPOTrainer(models_tiny.llama(tied=False), Tok(), toy_reward, cfg, [], value_model=critic())
    with pytest.raises(ValueError, match="train prompt 1 is empty"):
        PPOTrainer(models_tiny.llama(tied=False), Tok(), toy_reward, cfg, [{"prompt": "a"}, {"prompt": ""}],
                   value_model=critic())
    with pytest.raises(ValueError, match="train prompt 0 must be a dict with a 'prompt' key"):
        PPOTrainer(models_tiny.llama(tied=False), Tok(), toy_reward, cfg, ["just text"], value_model=critic())
    with pytest.raises(TypeError, match="PPOConfig"):
        PPOTrainer(models_tiny.llama(tied=False), Tok(), toy_reward, grpo.PolicyGradientConfig(), [{"prompt": "a"}])
    assert ppo.PPOConfig().group_size == 1 and ppo.PPOConfig().epochs == 4


def test_lora_policy_uses_the_disabled_adapter_as_reference_and_a_lora_critic(fake_rollouts):
    """A PEFT policy: the reference is the policy with its adapters disabled (no copy), the default
    critic is a copy of the decoder whose only trainable weights are its LoRA adapters and the head;
    a filter step runs and only LoRA weights of the policy move."""
    model = models_tiny.llama_lora()
    before = params(model)
    cfg = PPOConfig(feasible_set="filter", prompts_per_step=3, group_size=2, micro_batch=4, max_new_tokens=3,
                    target_batch=2, epochs=2, lr=1e-2, beta=0.1)
    tr = PPOTrainer(model, Tok(), toy_reward, cfg, prompt_rows(6, 1), prompt_rows(4, 2))
    assert tr.ref_model is None
    trainable = {n for n, p in tr.value_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    log = tr.step()
    assert math.isfinite(log["kl"]) and math.isfinite(log["value_loss"])
    after = params(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("lora_" in n for n in moved)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= moved
    tr.close()
