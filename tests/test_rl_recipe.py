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
    (["--drpost.scope", "global"], "accuracy"),                                    # GRPO (TRL) + drpost filter
    (["--rl.task", "bbc_headline", "--rl.algorithm", "grpo", "--rl.iif", "true"], "rougeL"),  # RM + GRPO (TRL), IIF
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
    if m["algorithm"] == "grpo":
        assert m["trainer"] == "trl" and (run / "eval_log.jsonl").is_file()
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert all(math.isfinite(h["seconds"]) and h["seconds"] > 0 for h in m["history"]["train"])
    if "ppo" in extra:
        assert m["algorithm"] == "ppo" and m["policy_config"]["lam"] == 0.95
        assert all(math.isfinite(h["value_loss"]) for h in m["history"]["train"])
    if metric == "rougeL":
        assert m["reward_model"]["pairs_train"] > 0 and 0 <= m["reward_model"]["held_out_accuracy"] <= 1
    preds = json.loads((run / "predictions.json").read_text())
    assert len(preds) == m["task"]["test"] and all("prediction" in p for p in preds)


def test_rl_run_rejects_resume(tmp_path):
    assert main(["train", TINY, "--output_dir", str(tmp_path), "--no-progress", "--resume"]) != 0


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_loop_algorithms_refuse_resume_and_torchrun(tmp_path, monkeypatch, algorithm):
    """RLOO and PPO stay on drpost's own loop: --resume and torchrun are clear errors naming grpo."""
    from drpost.recipes.common import RunDirError
    from drpost.recipes.rl import run_rl

    cfg = load_config(TINY, ["--rl.algorithm", algorithm, "--output_dir", str(tmp_path)])
    with pytest.raises(RunDirError, match=f"--resume is supported for rl.algorithm grpo only.*{algorithm}"):
        run_rl(cfg, resume=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunDirError, match="runs in one process for RLOO and PPO.*rl.algorithm grpo"):
        run_rl(cfg)
    assert not (tmp_path / "rl_tiny_test").exists()


def test_spectrum_refuses_an_rl_recipe(tmp_path):
    assert main(["spectrum", TINY, "--output_dir", str(tmp_path), "--no-progress"]) != 0


# ---------------------------------------------------------------------------------------------
# GRPO on TRL's trainer: the config mapping, the prompts, resume, two ranks
def test_grpo_config_maps_the_recipe_sections(tmp_path, tokenizer):
    from trl import GRPOTrainer

    from drpost.evaluation.generation import encode_prompts
    from drpost.recipes.rl_grpo import exact_match_reward, grpo_config, grpo_layout, trl_prompt_rows

    cfg = load_config(TINY, ["--rl.prompts_per_step", "3", "--rl.group_size", "4", "--rl.micro_batch", "5",
                             "--rl.max_new_tokens", "7", "--rl.temperature", "0.7", "--rl.beta", "0.1",
                             "--rl.clip_eps", "0.3", "--rl.epochs", "2", "--train.steps", "3", "--train.seed", "5",
                             "--train.save_steps", "2", "--drpost.refresh_every", "2", "--rl.target_loss",
                             "train-loss", "--drpost.scope", "global"])
    a = grpo_config(cfg, tmp_path)
    # 12 completions per step, micro-batches of 4 (the largest divisor of 12 <= 5), 3 accumulation steps
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.steps_per_generation) == (4, 3, 3)
    assert (a.num_generations, a.max_completion_length, a.temperature, a.beta, a.epsilon, a.epsilon_high) == \
        (4, 7, 0.7, 0.1, 0.3, 0.3)
    assert (a.num_iterations, a.max_steps, a.seed, a.learning_rate, a.loss_type, a.top_k) == (2, 6, 5, 1e-3, "dapo", 0)
    assert (a.feasible_set, a.frac, a.scope, a.refresh_every, a.target_strategy, a.target_loss, a.target_batch) == \
        ("filter", 1.0, "global", 2, "separate", "train-loss", 2)
    assert (a.save_strategy, a.save_steps, a.output_dir, a.gradient_checkpointing) == ("steps", 2, str(tmp_path), False)
    assert grpo_layout(cfg, world=2) == {"completions": 12, "per_rank": 6, "micro_batch": 3, "grad_accum": 2}
    iif = grpo_config(load_config(TINY, ["--rl.iif", "true", "--drpost.frac", "0.5"]), tmp_path)
    assert (iif.iif, iif.feasible_set, iif.frac) == (True, "standard", 0.5)
    with pytest.raises(ValueError, match="do not split evenly over 5 processes"):
        grpo_layout(cfg, world=5)
    with pytest.raises(ValueError, match="rl.iif true runs in one process only"):
        grpo_layout(load_config(TINY, ["--rl.iif", "true"]), world=2)
    with pytest.raises(ValueError, match="rl.target_batch x rl.group_size = 3 target completions"):
        grpo_layout(load_config(TINY, ["--rl.target_batch", "3", "--rl.group_size", "1", "--rl.prompts_per_step", "4"]),
                    world=2)
    with pytest.raises(ValueError, match="set rl.mini_batches 1"):
        grpo_config(load_config(TINY, ["--rl.mini_batches", "2"]), tmp_path)
    # the prompts TRL renders are the ones evaluation encodes (same system turn, same chat template)
    for system in (None, "", "Answer with one word."):
        rows = [{"prompt": "Classify: markets rally", "answer": "business", "id": 1}]
        ds = trl_prompt_rows(rows, system)
        assert ds.column_names == ["prompt", "answer", "id"] and ds[0]["prompt"][-1]["role"] == "user"
        fake = type("T", (), {"processing_class": tokenizer, "_is_vlm": False, "environment_factories": None,
                              "tools": None, "chat_template": None, "chat_template_kwargs": {}})()
        ids = GRPOTrainer._tokenize_prompts(fake, [ds[0]["prompt"]])[0]
        assert list(ids[0]) == encode_prompts(tokenizer, ["Classify: markets rally"], system)[0], system
    # TRL's reward signature: message-list completions, dataset columns as keyword arguments
    comp = [[{"role": "assistant", "content": " Business\n"}], [{"role": "assistant", "content": "sport"}]]
    assert exact_match_reward(prompts=[ds[0]["prompt"]] * 2, completions=comp, answer=["business"] * 2,
                              completion_ids=[[1], [2]], trainer_state=None, id=[1, 1]) == [1.0, 0.0]
    assert exact_match_reward(prompts=["p", "p"], completions=["tech", "Tech."], answer=["tech", "tech"]) == [1.0, 1.0]


def spread_reward(prompts, completions, answer=None, **kw):
    """A deterministic reward with spread (the share of vowels and spaces), so that tiny runs learn."""
    return [sum(ch in "aeiou " for ch in c) / max(len(c), 1) for c in completions]


def fixed_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """TRL's generation replaced by fixed completions: a function of the prompt tokens, the row's index in
    the global generation batch and the step (the same in one process and on two ranks)."""
    base = self.accelerator.process_index * len(prompt_ids)
    out = []
    for i, ids in enumerate(prompt_ids):
        g = torch.Generator().manual_seed((sum((k + 1) * t for k, t in enumerate(ids)) * 31 + (base + i) * 1009
                                           + self.state.global_step * 7) % (2 ** 31))
        n = 1 + int(torch.randint(self.max_completion_length, (1,), generator=g))
        out.append(torch.randint(200, 2000, (n,), generator=g).tolist())
    return out, None


def _patch_grpo(monkeypatch_or_none, fixed: bool):
    import drpost.recipes.rl_grpo as rlmod
    from drpost.integrations.trl_grpo import DrPostGRPOTrainer

    reward = rlmod.trl_reward(spread_reward, "spread")
    if monkeypatch_or_none is None:
        rlmod.exact_match_reward = reward
        if fixed:
            DrPostGRPOTrainer._generate_single_turn = fixed_single_turn
        return
    monkeypatch_or_none.setattr(rlmod, "exact_match_reward", reward)
    if fixed:
        monkeypatch_or_none.setattr(DrPostGRPOTrainer, "_generate_single_turn", fixed_single_turn, raising=False)


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter_model.safetensors"))


RESUME = ["--train.steps", "4", "--train.save_steps", "2", "--train.save_total_limit", "3", "--train.eval_every", "2",
          "--rl.temperature", "2.0", "--rl.max_new_tokens", "3", "--no-progress"]


def test_grpo_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """4 GRPO steps with a checkpoint at step 2; a second run is interrupted at step 3 (an error after the
    checkpoint) and continued with `drpost train --resume`: the same final adapter, the same step rows
    and evaluations as the uninterrupted run."""
    from drpost.integrations.trl_grpo import DrPostGRPOTrainer

    _patch_grpo(monkeypatch, fixed=False)
    assert main(["train", TINY, "--output_dir", str(tmp_path / "full"), *RESUME]) == 0
    step = DrPostGRPOTrainer.training_step

    def crash(self, *a, **k):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("interrupted after the checkpoint of step 2")
        return step(self, *a, **k)

    monkeypatch.setattr(DrPostGRPOTrainer, "training_step", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["train", TINY, "--output_dir", str(tmp_path / "cut"), *RESUME])
    run = tmp_path / "cut" / "rl_tiny_test"
    assert (run / "checkpoint-2" / "drpost_state.pt").is_file() and not (run / "metrics.json").exists()
    monkeypatch.setattr(DrPostGRPOTrainer, "training_step", step)
    assert main(["train", TINY, "--output_dir", str(tmp_path / "cut"), *RESUME, "--resume"]) == 0
    full = json.loads((tmp_path / "full" / "rl_tiny_test" / "metrics.json").read_text())
    cut = json.loads((run / "metrics.json").read_text())
    a, b = adapter(tmp_path / "full" / "rl_tiny_test"), adapter(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)      # it trained (B starts at 0)
    assert cut["resumed_from"].endswith("checkpoint-2") and full["resumed_from"] is None
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "step_time")} for r in rows]  # noqa: E731
    assert strip(cut["history"]["train"]) == strip(full["history"]["train"])
    assert [h["step"] for h in cut["history"]["train"]] == [1, 2, 3, 4]
    assert len({h["reward"] for h in full["history"]["train"]}) > 1 and any(h["grad_norm"] > 0
                                                                            for h in full["history"]["train"])
    assert cut["history"]["eval"] == full["history"]["eval"] and [e["step"] for e in cut["history"]["eval"]] == [0, 2, 4]
    assert cut["final"] == full["final"] and cut["start"] == full["start"]
    # resuming needs the same settings
    assert main(["train", TINY, "--output_dir", str(tmp_path / "cut"), *RESUME, "--resume", "--train.seed", "1"]) == 2


# two ranks (gloo, CPU) == one process, fixed completions (TRL's sampling differs with the world size)
DIST = ["--train.steps", "2", "--train.eval_every", "0", "--rl.micro_batch", "4", "--rl.beta", "0.0",
        "--rl.max_new_tokens", "3", "--train.save_final", "true", "--no-progress"]


def _dist_run(out: Path) -> dict:
    from drpost.recipes.rl import run_rl

    m = run_rl(load_config(TINY, [*DIST[:-1], "--output_dir", str(out)]), progress=False)
    if "rank" in m:
        return m
    return {"metrics": m, "adapter": adapter(Path(m["run_dir"]))}


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from dist_launch import Results, init_worker

    init_worker()
    _patch_grpo(None, fixed=True)
    res = Results()
    res.part("grpo", lambda: _dist_run(out / "two"))
    torch.save(res, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


def test_grpo_under_two_ranks_equals_one_process(tmp_path, monkeypatch):
    """`rl.algorithm grpo` under a 2-rank launch (gloo): each rank rolls out half of the completions, one
    global selection; rank 0 alone evaluates and writes the run directory; with fixed completions the
    final adapter, rewards and kept shares equal one process's."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_launch import launch, part_of

    got = part_of(launch(__file__, tmp_path, timeout=300), "grpo")
    assert got[1] == {"rank": 1, "run_dir": str(tmp_path / "two" / "rl_tiny_test")}
    two = got[0]["metrics"]
    run = tmp_path / "two" / "rl_tiny_test"
    for name in ("config.yaml", "metrics.json", "train_log.jsonl", "predictions.json", "eval_log.jsonl"):
        assert (run / name).is_file(), name
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert two["world_size"] == 2 and two["layout"]["micro_batch"] == 2
    _patch_grpo(monkeypatch, fixed=True)
    one = _dist_run(tmp_path / "one")
    assert one["metrics"]["world_size"] == 1 and one["metrics"]["layout"]["micro_batch"] == 4
    # float32 (the real 1-layer SmolLM2): the two ranks' summed gradients differ from one batch's by rounding,
    # which Adam's normalisation lifts to ~1e-6 on near-zero gradients; a real difference (another selection,
    # another rollout) moves elements by ~lr = 1e-3 per step
    for k, v in one["adapter"].items():
        torch.testing.assert_close(got[0]["adapter"][k], v, rtol=1e-3, atol=2e-5, msg=lambda m: f"{k}: {m}")
    assert any(float(v.abs().max()) > 1e-4 for k, v in one["adapter"].items() if "lora_B" in k)
    assert [h["step"] for h in two["history"]["train"]] == [1, 2]
    for key in ("reward", "kept"):
        assert [h[key] for h in two["history"]["train"]] == pytest.approx([h[key] for h in one["metrics"]["history"]["train"]],
                                                                          rel=1e-6), key
    assert any(h["kept"] < 1 for h in two["history"]["train"])      # the filter dropped completions
    assert two["final"] == one["metrics"]["final"]


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


def test_rl_results_report_only_with_zero_and_partial_runs(tmp_path):
    """benchmarks/rl_results.py --report-only: no runs at all, then some methods/seeds of the balanced
    settings; the paired t-test (drpost.stats.paired) gives a verdict only at p < 0.05."""
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("rl_results", ROOT / "benchmarks" / "rl_results.py")
    rr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rr)
    assert {"grpo_balanced", "ppo_balanced"} <= set(rr.SETTINGS)
    for part in ("grpo_balanced", "ppo_balanced"):
        cfg = load_config(ROOT / rr.SETTINGS[part]["config"], rr.SETTINGS[part]["overrides"])
        assert cfg.rl.balanced and cfg.rl.policy_algorithm == part.split("_")[0]
        assert rr.DEFAULT_SEEDS[part] == [0, 1, 2] and rr.SETTINGS[part]["methods"] == ["standard", "filter_layer", "iif"]
    out, doc = tmp_path / "runs", tmp_path / "doc" / "results_rl.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rl_results.py"), "--report-only", "--out",
                           str(out), "--doc", str(doc)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert doc.is_file() and "## GRPO" not in doc.read_text()

    def fake(part, method, seed, acc):
        d = rr.run_dir(out, part, method, seed)
        d.mkdir(parents=True)
        cfg = load_config(ROOT / rr.SETTINGS[part]["config"], rr.SETTINGS[part]["overrides"] + ["--train.seed", str(seed)])
        from drpost.config import config_to_dict

        hist = [{"step": i + 1, "reward": 0.2, "kept": 0.5, "kl": 0.0, "seconds": 1.0} for i in range(3)]
        (d / "metrics.json").write_text(json.dumps({
            "run_dir": str(d), "method": method, "algorithm": cfg.rl.policy_algorithm, "metric": "accuracy",
            "task": {"train": 200, "target": 20, "test": 60}, "final": {"accuracy": acc, "step": 16, "n_test": 60},
            "start": {"step": 0, "accuracy": 0.2} if seed == 0 and method == "standard" else None,
            "train_means": {"reward": 0.2, "kept": 0.5, "kl": 0.0, "seconds": 1.0}, "reward_model": None,
            "history": {"eval": [], "train": hist}, "seconds_total": 10.0, "config": config_to_dict(cfg)}))
        (d / "predictions.json").write_text(json.dumps([{"prediction": "sport"}, {"prediction": "tech"}]))

    for seed, (std, filt, iif) in enumerate([(0.20, 0.30, 0.25), (0.25, 0.36, 0.20), (0.30, 0.39, 0.35)]):
        fake("grpo_balanced", "standard", seed, std)
        fake("grpo_balanced", "filter_layer", seed, filt)
        if seed < 2:
            fake("grpo_balanced", "iif", seed, iif)
    fake("ppo_balanced", "iif", 0, 0.3)                        # no standard run to pair with
    rr.report(out, doc)
    text = doc.read_text()
    assert "## GRPO (TRL GRPOTrainer) on balanced BBC sections" in text and "## PPO" in text
    line = next(x for x in text.splitlines() if x.startswith("| filter_layer - standard"))
    assert "| 3 | +0.100 |" in line and line.endswith("| better |")          # differences .10, .11, .09: p < 0.05
    line = next(x for x in text.splitlines() if x.startswith("| iif - standard"))
    assert "| 2 |" in line and line.endswith("| no difference shown |")
    assert text.count("- standard |") == 2                      # nothing paired for PPO


if __name__ == "__main__":
    from dist_launch import worker_main

    worker_main(_worker)
