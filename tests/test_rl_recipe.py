"""Reward-model training, the `rl:` config section and `drpost train` end to end for both RL
recipes (SmolLM2 truncated to one layer, configs/rl_tiny_test.yaml)."""
import json
import math
from pathlib import Path

import pytest
import torch

from drpost.cli import main
from drpost.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "rl_tiny_test.yaml")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from drpost.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


def test_reward_model_training_reduces_the_bradley_terry_loss(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from drpost.rl.reward_model import bradley_terry_loss, encode_pairs, reward_model_from_causal_lm, \
        train_reward_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tokenizer.pad_token_id)
    rm = reward_model_from_causal_lm(LlamaForCausalLM(cfg), lora_r=0)
    pairs = [{"prompt": f"Write a headline: story {i} about {w}", "chosen": f"{w.title()} news today",
              "rejected": f"today news {w} {w}"} for i, w in enumerate(["markets", "music", "votes", "goals"])]

    def loss():
        with torch.no_grad():
            c = rm(**{k: v for k, v in encode_pairs(tokenizer, [p["prompt"] for p in pairs],
                                                    [p["chosen"] for p in pairs]).items() if k != "labels"})
            r = rm(**{k: v for k, v in encode_pairs(tokenizer, [p["prompt"] for p in pairs],
                                                    [p["rejected"] for p in pairs]).items() if k != "labels"})
        return float(bradley_terry_loss(c, r))

    before = loss()
    res = train_reward_model(rm, tokenizer, pairs, epochs=15, batch_size=4, lr=3e-3)
    after = loss()
    assert after < before - 0.1 and after < math.log(2)
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    with pytest.raises(ValueError, match="needs 'prompt', 'chosen' and 'rejected'"):
        train_reward_model(rm, tokenizer, [{"prompt": "x", "chosen": "y"}])


def test_rl_config_section_validates_with_clear_errors():
    cfg = load_config(TINY)
    assert cfg.recipe == "rl" and cfg.rl.task == "bbc_category"
    with pytest.raises(ConfigError, match=r"rl.target_batch.*must be <= rl.n_target \(4\)"):
        load_config(TINY, ["--rl.target_batch", "5"])
    with pytest.raises(ConfigError, match="did you mean 'rl.group_size'"):
        load_config(TINY, ["--rl.grup_size", "2"])
    with pytest.raises(ConfigError, match="did you mean 'bbc_category'"):
        load_config(TINY, ["--rl.task", "bbc_categroy"])
    with pytest.raises(ConfigError, match="recipe"):
        load_config(TINY, ["--recipe", "ppo"])
    with pytest.raises(ConfigError, match="must be >= 2 for RLOO"):
        load_config(TINY, ["--rl.algorithm", "rloo", "--rl.group_size", "1"])


@pytest.mark.parametrize("extra,metric", [
    (["--drpost.scope", "global"], "accuracy"),                                    # GRPO + drpost filter
    (["--rl.task", "bbc_headline", "--rl.iif", "true", "--drpost.feasible_set", "standard"], "rougeL"),  # RM + RLOO, IIF
    (["--rl.task", "bbc_headline", "--rl.algorithm", "ppo", "--rl.epochs", "2"], "rougeL"),  # RM + PPO, drpost filter
    (["--rl.algorithm", "ppo", "--rl.iif", "true", "--drpost.feasible_set", "standard"], "accuracy"),  # PPO, IIF
])
def test_drpost_train_rl_end_to_end(tmp_path, extra, metric):
    assert main(["train", TINY, "--output_dir", str(tmp_path), "--no-progress", *extra]) == 0
    run = tmp_path / "rl_tiny_test"
    m = json.loads((run / "metrics.json").read_text())
    for name in ("config.yaml", "train_log.jsonl", "predictions.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert m["metric"] == metric and 0.0 <= m["final"][metric] <= 1.0
    steps = m["config"]["train"]["steps"]
    assert [h["step"] for h in m["history"]["train"]] == list(range(1, steps + 1))
    for h in m["history"]["train"]:
        assert 0.0 <= h["kept"] <= 1.0 and math.isfinite(h["reward"])
    evals = [e["step"] for e in m["history"]["eval"]]
    assert evals[0] == 0 and evals[-1] == steps
    if "ppo" in extra:
        assert m["algorithm"] == "ppo" and m["policy_config"]["lam"] == 0.95
        assert all(math.isfinite(h["value_loss"]) for h in m["history"]["train"])
    if metric == "rougeL":
        assert m["reward_model"]["pairs_train"] > 0 and 0 <= m["reward_model"]["held_out_accuracy"] <= 1
    preds = json.loads((run / "predictions.json").read_text())
    assert len(preds) == m["task"]["test"] and all("prediction" in p for p in preds)


def test_rl_run_rejects_resume(tmp_path):
    assert main(["train", TINY, "--output_dir", str(tmp_path), "--no-progress", "--resume"]) != 0


def test_spectrum_refuses_an_rl_recipe(tmp_path):
    assert main(["spectrum", TINY, "--output_dir", str(tmp_path), "--no-progress"]) != 0


def test_rl_recipe_refuses_torchrun(monkeypatch):
    from drpost.config import load_config
    from drpost.recipes.rl import run_rl
    from drpost.recipes.sft import RunDirError

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "rl_tiny_test.yaml"))
    with pytest.raises(RunDirError, match="RL recipe runs in one process"):
        run_rl(cfg)


def test_rl_task_splits_are_disjoint():
    """METHOD §9.8 (evaluation prompts overlapping training prompts): train, target and test articles differ."""
    from drpost.rl.tasks import build_task

    for name in ("bbc_category", "bbc_headline"):
        task = build_task(name, n_train=40, n_target=8, n_test=20, n_pairs=16)
        ids = [{r["id"] for r in split} for split in (task.train, task.target, task.test)]
        assert [len(s) for s in ids] == [40, 8, 20], name
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]), name
        if task.preference_pairs:
            test_prompts = {r["prompt"] for r in task.test}
            assert not test_prompts & {p["prompt"] for p in task.preference_pairs}


def test_balanced_category_task_gives_every_split_equal_sections():
    """rl.balanced: no constant answer scores above 1/5 on the test split (the unbalanced corpus lets a
    policy collapsed on 'sport' or 'business' score ~0.23)."""
    from collections import Counter

    from drpost.config import OptionError, RLConfig
    from drpost.rl.tasks import SECTIONS, build_task, exact_match_reward

    task = build_task("bbc_category", n_train=50, n_target=10, n_test=60, balanced=True)
    for split in (task.train, task.target, task.test):
        assert Counter(r["answer"] for r in split) == {s: len(split) // 5 for s in SECTIONS}
    ids = [{r["id"] for r in split} for split in (task.train, task.target, task.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for constant in SECTIONS:
        acc = sum(exact_match_reward(None, [constant] * 60, [r["answer"] for r in task.test])) / 60
        assert acc == pytest.approx(0.2)
    assert build_task("bbc_category", n_test=60, balanced=True).test != build_task("bbc_category", n_test=60).test
    with pytest.raises(ValueError, match="balanced applies to the bbc_category task"):
        build_task("bbc_headline", balanced=True)
    with pytest.raises(OptionError, match="rl.balanced applies to the bbc_category task"):
        RLConfig(task="bbc_headline", balanced=True)
