"""Recipe config: YAML loading, overrides with type conversion, unknown keys, bad values."""

from pathlib import Path

import pytest
import yaml

from drpost.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_shipped_configs_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, Config) and cfg.train.steps == 50 and cfg.drpost.feasible_set == "layerwise"
    assert {p.name for p in CONFIGS} >= {"sft_bbc_headline.yaml", "sft_chatterbot_qa.yaml", "tiny_test.yaml"}
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.run_name == path.stem  # the run directory defaults to the file's stem


def test_overrides_convert_types():
    cfg = load_config(None, [
        "--train.steps", "2", "--lr=1e-4", "--train.bf16", "false", "--frac", "0.25", "--eval-every", "5",
        "--data.seed", "null", "--train.lora_targets", "q_proj,v_proj", "--eval.metrics", "[rougeL, f1]",
        "--data.target.sections", "business", "--train.freeze_embeddings", "--output_dir", "/tmp/x",
        "--train.max_grad_norm", "0", "--eval.n_test", "7",
    ])
    assert cfg.train.steps == 2 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.bf16 is False and cfg.train.freeze_embeddings is True
    assert cfg.drpost.frac == 0.25 and cfg.train.eval_every == 5 and cfg.data.seed is None
    assert cfg.train.lora_targets == ["q_proj", "v_proj"] and cfg.eval.metrics == ["rougeL", "f1"]
    assert cfg.data.target == {"task": "bbc_headline", "sections": "business"}
    assert cfg.output_dir == "/tmp/x" and cfg.train.max_grad_norm == 0.0 and cfg.eval.n_test == 7
    # a whole task spec as YAML, and a bare task name
    cfg = load_config(None, ["--data.target", "{task: chatterbot_qa, topics: [ai]}", "--data.test_size", "10"])
    assert cfg.data.target == {"task": "chatterbot_qa", "topics": ["ai"]}
    assert load_config(None, ["--data.target", "bbc_category"]).data.target == {"task": "bbc_category"}
    # YAML's "1e-4" is a string: still a float here
    assert config_from_dict({"train": {"lr": "1e-4", "steps": 3.0}}).train.lr == 1e-4
    assert parse_overrides(["--a.b=c", "--flag", "--x", "-1"]) == [("a.b", "c"), ("flag", "true"), ("x", "-1")]


@pytest.mark.parametrize("key,suggestion", [
    ("train.step", "train.steps"),
    ("stpes", "train.steps"),
    ("drpost.feasible", "drpost.feasible_set"),
    ("eval.ntest", "eval.n_test"),
    ("learning_rate", "train.lr"),
    ("data.max_length", "data.max_seq_length"),
])
def test_unknown_key_suggests_closest(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'.*did you mean '{suggestion}'"):
        load_config(None, [f"--{key}", "1"])


def test_unknown_keys_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"trian": {"steps": 3}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'trian' in .*bad.yaml; did you mean 'train'"):
        load_config(path)
    path.write_text(yaml.safe_dump({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match=r"'train.stepz' in .*did you mean 'train.steps'"):
        load_config(path)
    with pytest.raises(ConfigError, match="ambiguous: use one of data.seed, train.seed"):
        load_config(None, ["--seed", "1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("overrides,message", [
    (["--train.steps", "abc"], "'train.steps' must be an integer, got 'abc'"),
    (["--train.steps", "0"], "'train.steps' must be >= 1"),
    (["--train.bf16", "maybe"], "'train.bf16' must be true or false"),
    (["--train.lr", "fast"], "'train.lr' must be a number"),
    (["--train.lr", "-1"], "'train.lr' must be a positive number"),
    (["--drpost.frac", "1.5"], r"'drpost.frac' .*must be a number in \(0, 1\], got 1.5"),
    (["--drpost.sketch", "gaussian"], r"config key 'drpost.sketch': .*sketch"),
    (["--drpost.greedy_lr", "0"], "'drpost.greedy_lr' must be a positive number"),
    (["--drpost.target_batch_size", "0"], "'drpost.target_batch_size' must be a positive integer"),
    (["--drpost.scoring", "direkt"], "'drpost.scoring'.*did you mean 'direct'"),
    (["--rl.group_size", "0"], "'rl.group_size' must be an integer >= 1"),
    (["--rl.target_source", "pol"], "'rl.target_source' must be one of pool, self.*did you mean 'pool'"),
    (["--drpost.feasible_set", "layrwise"], "did you mean 'layerwise'"),
    (["--data.target_share", "1"], r"must be in \[0, 1\)"),
    (["--data.overlong", "cut"], "'data.overlong' must be one of truncate, drop"),
    (["--data.target", "bbc_headlin"], "unknown task 'bbc_headlin'; did you mean 'bbc_headline'"),
    (["--data.target.sectons", "tech"], "unknown key 'sectons'; did you mean 'sections'"),
    (["--eval.metrics", "[bleu]"], "'eval.metrics' must be one of"),
    (["--drpost.target_batch_size", "32"], r"must be <= data.n_target \(16\)"),
    (["--train.lr_scheduler", "cosin"], "did you mean 'cosine'"),
])
def test_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_types_in_yaml_and_general_entries():
    with pytest.raises(ConfigError, match="'train.steps' must be an integer, got True"):
        config_from_dict({"train": {"steps": True}})
    with pytest.raises(ConfigError, match="'model.name' must be a string"):
        config_from_dict({"model": {"name": 3}})
    with pytest.raises(ConfigError, match="section 'train'.*must be a mapping"):
        config_from_dict({"train": [1, 2]})
    with pytest.raises(ConfigError, match=r"data.general\[0\]: give 'count' or 'weight', not both"):
        config_from_dict({"data": {"general": [{"task": "bbc_category", "count": 3, "weight": 1}]}})
    with pytest.raises(ConfigError, match=r"data.general\[1\]: give exactly one of 'task'.*or 'source'"):
        config_from_dict({"data": {"general": ["bbc_category", {"weight": 1}]}})
    with pytest.raises(ConfigError, match=r"data.general\[0\].count' must be an integer >= 0"):
        config_from_dict({"data": {"general": [{"task": "bbc_category", "count": -1}]}})
    with pytest.raises(ConfigError, match="'data.n_general' is null, so every data.general entry needs a 'count'"):
        config_from_dict({"data": {"n_general": None}})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS[0], ["--train.steps", "3", "--data.target.sections", "[sport]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert load_config(path.parent).train.steps == 3  # a run directory works as the config path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    again = load_config(save_config(cfg, tmp_path / "config.yaml"))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_drpost_section_is_the_engine_options():
    """The drpost: section is DrPostOptions (plus target_batch_size and frac='auto''s knobs); its seed is
    train.seed."""
    import dataclasses

    from drpost import DrPostOptions
    from drpost.config import valid_keys

    engine = {f.name for f in dataclasses.fields(DrPostOptions)}
    keys = {k.split(".", 1)[1] for k in valid_keys() if k.startswith("drpost.")}
    assert keys == engine - {"seed"} | {"target_batch_size", "auto_fracs", "auto_every", "auto_holdout"}
    cfg = load_config(None, ["--train.seed", "7", "--drpost.frac", "0.25"])
    assert isinstance(cfg.drpost, DrPostOptions) and cfg.drpost.nonfinite == "skip"
    assert cfg.drpost.engine_options() == DrPostOptions(frac=0.25, seed=7, nonfinite="skip")
    assert "seed" not in config_to_dict(cfg)["drpost"]
    with pytest.raises(ConfigError, match="unknown config key 'drpost.seed'.*did you mean 'train.seed'"):
        load_config(None, ["--drpost.seed", "1"])


def test_train_fsdp_is_refused_outside_the_sft_recipe():
    with pytest.raises(ConfigError, match="'train.fsdp' applies to the sft recipe only"):
        load_config(None, ["--recipe", "rl", "--train.fsdp", "true"])
