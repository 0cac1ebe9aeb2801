"""DrPostGRPOTrainer (TRL GRPOTrainer integration): the real SmolLM2 tokenizer, a tiny float64 Llama
with the tokenizer's vocabulary, TRL's own generation (sampling) and reward-function path.

References:
* stock ``trl.GRPOTrainer`` with the same arguments and seed: a feasible set that keeps every completion
  must reproduce it step for step (parameters to ~1e-9 in float64) -- the generations match because
  drpost's target rollouts run under a forked RNG;
* a hand-made oracle for a selecting feasible set: batch-size-1 gradients of each completion's loss,
  scored against the hand-computed target gradient, the negatives dropped, combined by hand;
* one process for two ranks (gloo): sampling cannot match across world sizes (each rank samples its own
  slice with its own RNG), so both runs patch TRL's ``_generate_single_turn`` to return fixed completions
  (a function of the prompt tokens, the row's index in the global generation batch and the step);
* an uninterrupted run for a resumed one.

Both the stock and the drpost trainers compute TRL's reference/old log-probs in float64 here
(:class:`Float64LogProbs`): TRL's fused LM-head kernel computes them in float32.
"""
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "red", "green", "blue", "cat", "dog"]


def tokenizer():
    from transformers import AutoTokenizer

    from drpost.models import smollm2_path
    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


def tiny_model(vocab: int, seed: int = 0, pad_id: int = 2):
    import models_tiny as mt
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=pad_id, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.15, attn_implementation="sdpa")
    model = mt._finish(mt.exact_rmsnorm(LlamaForCausalLM(cfg)), seed)
    # every 5th token id ends a completion too, so that completion lengths vary (a random tiny model
    # would otherwise always run to max_completion_length, and 'grpo' would equal 'dapo')
    model.generation_config.eos_token_id = [2] + list(range(5, vocab, 5))
    return model


def prompts(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": f"Say {WORDS[int(i)]}:", "word": WORDS[int(i)]}
            for i in torch.randint(len(WORDS), (n,), generator=g)]


def ds(rows):
    from datasets import Dataset
    return Dataset.from_list(rows)


def letters_reward(prompts, completions, **kw):
    """A deterministic reward with spread: the share of characters of the completion in 'aeiou '."""
    return [sum(ch in "aeiou " for ch in c) / max(len(c), 1) for c in completions]


def length_reward(prompts, completions, word=None, **kw):
    return [float(len(c) % 5) / 4.0 for c in completions]


class Float64LogProbs:
    """TRL's reference / old log-probs (and the stock loss's) from the model's plain float64 logits."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kw):
        from trl.trainer.utils import selective_log_softmax

        batch_size = batch_size or input_ids.size(0)
        logps, ents = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[s:s + batch_size], attention_mask[s:s + batch_size]
            logits = model(input_ids=ids, attention_mask=am).logits
            logits = logits[:, -logits_to_keep - 1:-1] / self.temperature
            logps.append(selective_log_softmax(logits, ids[:, -logits_to_keep:]))
            if compute_entropy:
                p = torch.softmax(logits, -1)
                ents.append(-(p * torch.log_softmax(logits, -1)).sum(-1))
        return torch.cat(logps), (torch.cat(ents) if compute_entropy else None), None


class FixedCompletions:
    """Generation replaced by fixed completions: a function of the prompt tokens, the row's index in the
    global generation batch and the step (the same in one process and on two ranks)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        base = self.accelerator.process_index * len(prompt_ids)
        out = []
        for i, ids in enumerate(prompt_ids):
            seed = (sum((k + 1) * t for k, t in enumerate(ids)) * 31 + (base + i) * 1009
                    + self.state.global_step * 7) % (2 ** 31)
            g = torch.Generator().manual_seed(seed)
            n = 1 + int(torch.randint(self.max_completion_length, (1,), generator=g))
            toks = torch.randint(200, 2000, (n,), generator=g).tolist()
            if n < self.max_completion_length and n % 2:
                toks.append(self.eos_token_ids[0])
            out.append(toks)
        return out, None


def _classes(fixed: bool):
    from trl import GRPOTrainer

    from drpost.integrations.trl_grpo import DrPostGRPOTrainer

    mix = (FixedCompletions, Float64LogProbs) if fixed else (Float64LogProbs,)
    stock = type("StockF64", mix + (GRPOTrainer,), {})
    dr = type("DrPostF64", mix + (DrPostGRPOTrainer,), {})
    return stock, dr


def config_kw(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                num_generations=4, max_completion_length=6, learning_rate=5e-2, max_steps=3, logging_steps=1,
                save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0, bf16=False,
                temperature=1.0, loss_type="dapo", beta=0.0)
    base.update(kw)
    return base


@pytest.fixture(autouse=True)
def _ref_model_copy(monkeypatch):
    """beta > 0: TRL builds its reference model from the policy's hub id; the tiny model has none, so
    hand it a copy of the initial policy (what a hub load would give)."""
    import trl.trainer.grpo_trainer as gt

    monkeypatch.setattr(gt, "create_model_from_path", lambda *a, **k: copy.deepcopy(_INITIAL[0]))


_INITIAL = [None]


def build(tmp_path, tok, name, drpost: bool, fixed: bool = False, reward_funcs=None, target="default",
          train=None, lora=False, **kw):
    stock_cls, dr_cls = _classes(fixed)
    model = tiny_model(len(tok), pad_id=tok.pad_token_id)
    _INITIAL[0] = copy.deepcopy(model)
    rf = reward_funcs or [letters_reward, length_reward]
    train = ds(train if train is not None else prompts(16, 1))
    extra = {}
    if lora:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj",
                                                                                             "down_proj"])
    if drpost:
        from drpost.integrations.trl_grpo import DrPostGRPOConfig

        kw.setdefault("target_batch", 2)
        args = DrPostGRPOConfig(**config_kw(tmp_path, name, **kw))
        return dr_cls(model=model, reward_funcs=rf, args=args, train_dataset=train, processing_class=tok,
                      target_dataset=prompts(6, 2) if target == "default" else target, **extra)
    from trl import GRPOConfig

    return stock_cls(model=model, reward_funcs=rf, args=GRPOConfig(**config_kw(tmp_path, name, **kw)),
                     train_dataset=train, processing_class=tok, **extra)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_close(a, b, rtol=1e-9, atol=1e-11):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def train_logs(trainer):
    return [r for r in trainer.state.log_history if "loss" in r]


@pytest.fixture(scope="module")
def tok():
    t = tokenizer()
    assert t.pad_token_id is not None
    return t


# ---------------------------------------------------------------------------------------------
# 1. a feasible set that keeps everything == stock GRPOTrainer
KEEP_ALL = [
    ("standard-dapo", dict(feasible_set="standard")),
    ("filter-pool-dapo-kl-ga2", dict(feasible_set="filter", frac=1e-9, target_source="pool", beta=0.1,
                                     gradient_accumulation_steps=2)),
    ("layerwise-self-grpo-ga2", dict(feasible_set="layerwise", frac=1.0, target_source="self", loss_type="grpo",
                                     gradient_accumulation_steps=2, refresh_every=2)),
    ("global-pool-drgrpo-iter2", dict(feasible_set="global", frac=1.0, loss_type="dr_grpo", num_iterations=2,
                                      target_loss="train-loss", epsilon=0.1)),
    ("filter-self-cispo", dict(feasible_set="filter", frac=1e-9, target_source="self", loss_type="cispo",
                               num_iterations=2, epsilon_high=0.05)),
    ("rowwise-pool-sapo-iter2-kl", dict(feasible_set="rowwise", frac=1.0, loss_type="sapo", num_iterations=2,
                                        beta=0.05, target_loss="train-loss")),
    ("filter-global-dapo-delta-kl", dict(feasible_set="filter", frac=1e-9, scope="global", num_iterations=2,
                                         epsilon=0.05, delta=1.02, beta=0.2, use_bias_correction_kl=True)),
    ("layerwise-lora-dapo-kl", dict(feasible_set="layerwise", frac=1.0, lora=True, beta=0.1,
                                    gradient_accumulation_steps=2)),
]


@pytest.mark.parametrize("name,kw", KEEP_ALL, ids=[k[0] for k in KEEP_ALL])
def test_keep_all_equals_stock_grpo(tmp_path, tok, name, kw):
    drpost_only = {k: kw[k] for k in ("feasible_set", "frac", "target_source", "refresh_every", "target_loss",
                                      "scope") if k in kw}
    common = {k: v for k, v in kw.items() if k not in drpost_only}
    stock = build(tmp_path, tok, "stock", drpost=False, **common)
    before = params_of(stock.model)
    stock.train()
    dr = build(tmp_path, tok, "dr", drpost=True, **kw)
    dr.train()
    ref, got = params_of(stock.model), params_of(dr.model)
    assert any(not torch.equal(before[n], ref[n]) for n in ref)        # the run trained
    assert_params_close(got, ref)
    s_logs, d_logs = train_logs(stock), train_logs(dr)
    assert len(s_logs) == len(d_logs) == 3
    for s, d in zip(s_logs, d_logs):
        assert d.get("reward") == s.get("reward")                      # the same rollouts
        for key in ("loss", "entropy", "kl", "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max",
                    "cispo_clip_ratio"):
            assert (key in d) == (key in s), key
            if key in s:
                assert d[key] == pytest.approx(s[key], rel=1e-6, abs=1e-9), key
        assert d["drpost/kept"] == 1.0
    if kw.get("feasible_set") != "standard":
        assert dr.regularizer.feasible_set == kw["feasible_set"] and "drpost/target_reward" in d_logs[0]


@pytest.mark.parametrize("fset", ["standard", "filter"])
def test_truncated_completions_masked_equals_stock(tmp_path, tok, fset):
    """mask_truncated_completions=True with short completions empties whole micro-batches: TRL adds a
    zero loss for them, drpost skips them and finalises the step at the last non-empty one."""
    kw = dict(mask_truncated_completions=True, max_completion_length=1, gradient_accumulation_steps=2,
              max_steps=4)
    stock = build(tmp_path, tok, "stock", drpost=False, **kw)
    stock.train()
    dr = build(tmp_path, tok, "dr", drpost=True, feasible_set=fset, frac=1e-9, target_source="self", **kw)
    dr.train()
    assert dr.skipped_micro_batches > 0
    assert_params_close(params_of(dr.model), params_of(stock.model))
    for s, d in zip(train_logs(stock), train_logs(dr)):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# 2. a selecting feasible set: drops the negatively scored completions, update == hand-made oracle
class Recording:
    """Keeps the engine batches of the general micro-batches and of the target capture."""

    def engine_batch(self, inputs, role="general"):
        b = super().engine_batch(inputs, role)
        self.seen.setdefault(role, []).append({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                               for k, v in b.items()})
        return b


def _row_logps(model, batch, i):
    c = int(batch["_completion_len"][0])
    ids, am = batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1]
    logits = model(input_ids=ids, attention_mask=am).logits[:, -c - 1:-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, -c:, None])[..., 0]
    mask = batch["labels"][i:i + 1, -c:] != -100
    return (logp * mask).sum(), mask.sum()


def _target_weights(tok, tgt, target_loss, group):
    """The target rows' weights recomputed from their completions: the reward functions on the decoded
    completions, then the batch z-score ('reward') or TRL's group advantages ('train-loss')."""
    c = int(tgt["_completion_len"][0])
    ids = tgt["input_ids"][:, -c:]
    mask = tgt["attention_mask"][:, -c:].bool()
    texts = [tok.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(ids, mask)]
    r = torch.tensor(letters_reward(None, texts), dtype=torch.float32) + torch.tensor(length_reward(None, texts),
                                                                                      dtype=torch.float32)
    if target_loss == "reward":
        r = r.double()
        return (r - r.mean()) / r.std(unbiased=False)
    g = r.view(-1, group)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).flatten()


@pytest.mark.parametrize("scope,target_loss", [("global", "reward"), ("layer", "reward"), ("layer", "train-loss")])
def test_filter_drops_negatives_and_matches_oracle(tmp_path, tok, scope, target_loss):
    """One step, SGD (lr 1, no clipping): the update is -grad. Oracle: per completion, the batch-size-1
    gradient G_i of -A_i sum_t log pi (TRL's dapo loss at ratio 1); the target gradient g_T of
    -sum_v w_v sum_t log pi over the target rollout ('pool'), w recomputed from the decoded target
    completions (z-scored rewards for 'reward', group advantages for 'train-loss'); scores <G_i, g_T> per
    scored layer (summed over layers for scope='global'); the chosen = score >= 0; scored layers get
    sum_chosen G_i / their tokens, the norms the plain token mean over every completion."""
    from drpost.integrations.trl_grpo import DrPostGRPOConfig, DrPostGRPOTrainer

    _, dr_cls = _classes(False)
    rec_cls = type("Rec", (Recording, dr_cls), {"seen": None})
    model = tiny_model(len(tok), pad_id=tok.pad_token_id)
    oracle_model = copy.deepcopy(model)
    args = DrPostGRPOConfig(**config_kw(tmp_path, "sel", feasible_set="filter", frac=1.0, scope=scope,
                                        target_source="pool", target_batch=2, target_loss=target_loss, max_steps=1,
                                        optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                                        lr_scheduler_type="constant", per_device_train_batch_size=8))
    t = rec_cls(model=model, reward_funcs=[letters_reward, length_reward], args=args,
                train_dataset=ds(prompts(16, 1)), processing_class=tok, target_dataset=prompts(6, 2))
    assert isinstance(t, DrPostGRPOTrainer)
    t.seen = {}
    before = params_of(model)
    t.train()
    after = params_of(model)
    update = {n: before[n] - after[n] for n in before}                  # = .grad (SGD, lr 1)
    gen, tgt = t.seen["general"][0], t.seen["target"][0]
    torch.testing.assert_close(tgt["advantages"].double(), _target_weights(tok, tgt, target_loss, 4).double(),
                               rtol=1e-5, atol=1e-6)
    n = gen["input_ids"].shape[0]
    groups = t.regularizer.layer_groups
    names = {id(p): nm for nm, p in oracle_model.named_parameters()}
    params = list(oracle_model.parameters())

    def grad_of(loss):
        return dict(zip([names[id(p)] for p in params], torch.autograd.grad(loss, params, allow_unused=True)))

    per, tokens = [], []
    for i in range(n):
        s, m = _row_logps(oracle_model, gen, i)
        per.append(grad_of(-gen["advantages"][i].double() * s))
        tokens.append(float(m))
    gt = None
    for v in range(tgt["input_ids"].shape[0]):
        s, _ = _row_logps(oracle_model, tgt, v)
        g = grad_of(-tgt["advantages"][v].double() * s)
        gt = g if gt is None else {k: gt[k] + g[k] for k in g}
    pname = {id(p): nm for nm, p in model.named_parameters()}
    layer_params = [[pname[id(p)] for p in g.params] for g in groups]

    def score(i, layer):
        return sum(float((per[i][k] * gt[k]).sum()) for k in layer)

    if scope == "global":
        s = [sum(score(i, layer) for layer in layer_params) for i in range(n)]
        chosen = {tuple(layer): [i for i in range(n) if s[i] >= 0] for layer in layer_params}
    else:
        chosen = {tuple(layer): [i for i in range(n) if score(i, layer) >= 0] for layer in layer_params}
    assert any(len(c) < n for c in chosen.values()), "the test needs some negatively scored completions"
    assert all(len(c) > 0 for c in chosen.values())
    expected = {}
    for layer, idx in chosen.items():
        for k in layer:
            expected[k] = sum(per[i][k] for i in idx) / sum(tokens[i] for i in idx)
    for k in update:
        if k not in expected:                                          # unscored: every completion
            expected[k] = sum(per[i][k] for i in range(n)) / sum(tokens)
    assert_params_close(update, expected, rtol=1e-8, atol=1e-12)
    kept = train_logs(t)[0]["drpost/kept"]
    mean_kept = sum(len(c) for c in chosen.values()) / len(chosen) / n
    assert kept == pytest.approx(mean_kept) and kept < 1.0


def test_iif_drops_negatives_and_trains_plainly(tmp_path, tok):
    """IIF: the rollout is scored once (global), the negatives dropped, the rest trains plainly: equal to
    the global filter on a rollout trained in one micro-batch (same scores, same chosen set)."""
    kw = dict(target_source="pool", max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
              per_device_train_batch_size=8)
    iif = build(tmp_path, tok, "iif", drpost=True, feasible_set="filter", frac=1.0, iif=True, **kw)
    before = params_of(iif.model)
    iif.train()
    glob = build(tmp_path, tok, "glob", drpost=True, feasible_set="filter", frac=1.0, scope="global", **kw)
    glob.train()
    kept = train_logs(iif)[0]["drpost/iif_kept"]
    assert 0 < kept < 1
    assert train_logs(glob)[0]["drpost/kept"] == pytest.approx(kept)
    a, b = params_of(iif.model), params_of(glob.model)
    scored = {n for g in glob.regularizer.layer_groups for n, p in glob.model.named_parameters()
              if any(p is q for q in g.params)}
    for n in scored:                                                    # norms differ: IIF trains them on the kept rows
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-11, msg=lambda m: f"{n}: {m}")
    assert any(not torch.equal(before[n], a[n]) for n in a)
    # the same rollout in two micro-batches of 4: the same kept set, the same plain token mean over it
    kw["per_device_train_batch_size"] = 4
    iif2 = build(tmp_path, tok, "iif2", drpost=True, feasible_set="filter", frac=1.0, iif=True,
                 gradient_accumulation_steps=2, **kw)
    iif2.train()
    assert train_logs(iif2)[0]["drpost/iif_kept"] == kept
    assert_params_close(params_of(iif2.model), a)


# ---------------------------------------------------------------------------------------------
# 4. exact resume
def test_resume_equals_uninterrupted(tmp_path, tok):
    """refresh_every=3, checkpoint at step 2, 4 steps: the resumed run reuses the checkpointed target
    gradient at step 3 (captured at step 1) and recaptures at step 4, like the uninterrupted run."""
    kw = dict(feasible_set="layerwise", frac=0.5, target_source="pool", refresh_every=3, max_steps=4,
              save_strategy="steps", save_steps=2)
    full = build(tmp_path, tok, "full", drpost=True, **kw)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "drpost_state.pt").is_file()
    resumed = build(tmp_path, tok, "resumed", drpost=True, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert_params_close(params_of(resumed.model), params_of(full.model), rtol=1e-12, atol=1e-14)
    f, r = train_logs(full), train_logs(resumed)[2:]             # the checkpoint carries the first 2 logs
    assert [x["step"] for x in r] == [3, 4]
    assert [x["reward"] for x in f[2:]] == [x["reward"] for x in r]
    assert [x["drpost/kept"] for x in f[2:]] == [x["drpost/kept"] for x in r]
    assert "drpost/target_reward" not in r[0] and "drpost/target_reward" in r[1]   # step 3 reuses, step 4 refreshes
    assert r[1]["drpost/target_reward"] == f[3]["drpost/target_reward"]


def test_resume_needs_the_target_cache(tmp_path, tok):
    """The checkpointed target gradient matters: resumed without it (drpost_state.pt removed) the run
    refuses, rather than silently continuing with another target."""
    kw = dict(feasible_set="layerwise", frac=0.5, target_source="pool", refresh_every=3, max_steps=3,
              save_strategy="steps", save_steps=2)
    full = build(tmp_path, tok, "full", drpost=True, **kw)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    (ckpt / "drpost_state.pt").unlink()
    resumed = build(tmp_path, tok, "resumed", drpost=True, **kw)
    with pytest.raises(ValueError, match="has no drpost_state.pt"):
        resumed.train(resume_from_checkpoint=str(ckpt))


# ---------------------------------------------------------------------------------------------
# 5. bad input
def test_bad_inputs(tmp_path, tok):
    from drpost.engine import OptionError
    from drpost.integrations.trl_grpo import DrPostGRPOConfig
    from drpost.rl.rewards import RewardError

    with pytest.raises(ValueError, match="target dataset has 1 prompts, fewer than target_batch=2"):
        build(tmp_path, tok, "x", drpost=True, feasible_set="filter", target=prompts(1, 3))
    with pytest.raises(ValueError, match="need target prompts: pass target_dataset="):
        build(tmp_path, tok, "x", drpost=True, feasible_set="layerwise", target=None)
    build(tmp_path, tok, "x", drpost=True, feasible_set="layerwise", target=None, target_source="self")   # fine
    build(tmp_path, tok, "x", drpost=True, feasible_set="standard", target=None)                         # fine
    with pytest.raises(ValueError, match="loss_type='bnpo' is not supported.*use loss_type='dapo'"):
        DrPostGRPOConfig(**config_kw(tmp_path, "x", loss_type="bnpo"))
    with pytest.raises(ValueError, match="unknown loss_type 'nope'"):
        DrPostGRPOConfig(**config_kw(tmp_path, "x", loss_type="nope"))
    with pytest.raises(ValueError, match="importance_sampling_level='sequence'"):
        DrPostGRPOConfig(**config_kw(tmp_path, "x", importance_sampling_level="sequence", loss_type="grpo"))
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        DrPostGRPOConfig(**config_kw(tmp_path, "x", top_entropy_quantile=0.5))
    with pytest.raises(ValueError, match="steps_per_generation = gradient_accumulation_steps"):
        DrPostGRPOConfig(**config_kw(tmp_path, "x", steps_per_generation=2))
    with pytest.raises(OptionError, match="DrPostGRPOConfig: .*iif=True.*'standard' or 'filter'"):
        DrPostGRPOConfig(**config_kw(tmp_path, "x", iif=True, feasible_set="layerwise"))
    with pytest.raises(OptionError, match="target_strategy='separate'"):
        DrPostGRPOConfig(**config_kw(tmp_path, "x", target_strategy="merged"))
    with pytest.raises(OptionError, match="target_source must be one of"):
        DrPostGRPOConfig(**config_kw(tmp_path, "x", target_source="elsewhere"))
    with pytest.raises(TypeError, match="needs DrPostGRPOConfig"):
        from trl import GRPOConfig

        from drpost.integrations.trl_grpo import DrPostGRPOTrainer
        DrPostGRPOTrainer(model=tiny_model(len(tok)), reward_funcs=letters_reward,
                          args=GRPOConfig(**config_kw(tmp_path, "x")), train_dataset=ds(prompts(8, 1)))

    def broken_reward(prompts, completions, **kw):
        raise KeyError("answer")

    t = build(tmp_path, tok, "x", drpost=True, feasible_set="standard", reward_funcs=[letters_reward, broken_reward])
    with pytest.raises(RewardError, match="reward function 'broken_reward' raised KeyError: 'answer'"):
        t.train()

    def nan_reward(prompts, completions, **kw):
        return [float("nan") if i == 2 else 1.0 for i in range(len(completions))]

    t = build(tmp_path, tok, "x", drpost=True, feasible_set="standard", reward_funcs=[nan_reward])
    with pytest.raises(RewardError, match=r"reward function 'nan_reward' returned nan for row 2 \(prompt 'Say"):
        t.train()

    t = build(tmp_path, tok, "x", drpost=True, feasible_set="filter", mask_truncated_completions=True,
              max_completion_length=1, target_batch=1, max_steps=10)
    with pytest.raises(ValueError, match="target rollouts of step .* have no completion token .*every completion "
                                         "was truncated"):
        t.train()

    def none_reward(prompts, completions, **kw):     # None: TRL's "does not apply", accepted
        return [None if i == 1 else 0.5 * i for i in range(len(completions))]

    build(tmp_path, tok, "x", drpost=True, feasible_set="standard", reward_funcs=[none_reward], max_steps=1).train()


def test_config_flags(tmp_path):
    """TrlParser offers the drpost fields as flags, with their choices and checks."""
    from trl import TrlParser

    from drpost.integrations.trl_grpo import DrPostGRPOConfig

    (args,) = TrlParser(DrPostGRPOConfig).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--feasible_set", "layerwise", "--frac", "0.25", "--target_source", "self",
         "--refresh_every", "3", "--target_loss", "train-loss", "--iif", "false", "--use_cpu", "true"])
    assert (args.feasible_set, args.frac, args.target_source, args.refresh_every, args.target_loss, args.iif) == \
        ("layerwise", 0.25, "self", 3, "train-loss", False)
    assert (DrPostGRPOConfig(output_dir=str(tmp_path), use_cpu=True).feasible_set,
            DrPostGRPOConfig(output_dir=str(tmp_path), use_cpu=True).frac) == ("filter", 1.0)
    with pytest.raises(SystemExit):
        TrlParser(DrPostGRPOConfig).parse_args_and_config(["--output_dir", str(tmp_path), "--target_loss", "kl"])


# ---------------------------------------------------------------------------------------------
# 3. two ranks (gloo, CPU) == one process
def run_grpo_worker(out_dir: str, per_device: int, **kw) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    tok = tokenizer()
    t = build(Path(out_dir), tok, "dist", drpost=True, fixed=True, per_device_train_batch_size=per_device, **kw)
    t.train()
    logs = [{k: r[k] for k in ("loss", "reward", "drpost/kept") if k in r} for r in train_logs(t)]
    return {"params": params_of(t.model), "logs": logs, "world": t.args.world_size,
            "wrapped": type(t.model_wrapped).__name__, "distributed": t.regularizer.distributed}


DIST_PARTS = {
    "filter-pool": dict(feasible_set="filter", frac=1.0, target_source="pool", target_batch=2),
    # one micro-batch per step: with gradient accumulation TRL shuffles each rank's rollout before cutting it
    # into micro-batches, so a micro-batch of two ranks holds other completions than one process's, and a
    # per-micro-batch selection differs (by design, not by error)
    "layerwise-self-grpo": dict(feasible_set="layerwise", frac=0.5, target_source="self", loss_type="grpo"),
    "standard-drgrpo-ga2": dict(feasible_set="standard", loss_type="dr_grpo", gradient_accumulation_steps=2),
}


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from dist_launch import Results, init_worker

    init_worker()
    res = Results()
    for name, kw in DIST_PARTS.items():
        res.part(name, lambda kw=kw, name=name: run_grpo_worker(str(out / f"{name}{dist.get_rank()}"), per_device=2,
                                                                **kw))
    torch.save(res, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from dist_launch import launch

    out = tmp_path_factory.mktemp("grpo-dist")
    return launch(__file__, out, timeout=600)


@pytest.mark.parametrize("part", list(DIST_PARTS))
def test_two_ranks_equal_one_process(tmp_path, tok, two_ranks, part):
    from dist_launch import part_of

    got = part_of(two_ranks, part)
    ref = run_grpo_worker(str(tmp_path / "one"), per_device=4, **DIST_PARTS[part])
    assert got[0]["world"] == 2 and got[0]["distributed"] and not ref["distributed"]
    assert got[0]["wrapped"] == got[1]["wrapped"] == "LlamaForCausalLM"        # no DDP wrapper
    for name, p in ref["params"].items():
        torch.testing.assert_close(got[0]["params"][name], p, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
        assert torch.equal(got[0]["params"][name], got[1]["params"][name]), name
    assert [r["reward"] for r in got[0]["logs"]] == pytest.approx([r["reward"] for r in ref["logs"]], rel=1e-6)
    assert [r["drpost/kept"] for r in got[0]["logs"]] == pytest.approx([r["drpost/kept"] for r in ref["logs"]])
    if part != "standard-drgrpo-ga2":
        assert any(r["drpost/kept"] < 1 for r in ref["logs"])


if __name__ == "__main__":
    from dist_launch import worker_main

    worker_main(_worker)
