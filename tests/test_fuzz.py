"""Property tests over hostile input (issue 7, part 3): configs, data rows, data files and batches.

Every generated case must end in a usable result or in one of drpost's own, specific errors
(ConfigError, BadRowError, SequenceTooLongError, a ValueError/TypeError raised by drpost with a
message); never a traceback from inside PyTorch, PyYAML or the tokenizer, and never a hang (each
example has a deadline). Example counts are sized so the whole file runs in well under 40 s."""
from __future__ import annotations

import dataclasses
import json
import math
import traceback

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import models_tiny as mt
from drpost import DataRegularizer
from drpost.config import SECTIONS, ConfigError, config_from_dict, load_config, valid_keys
from drpost.data.chat import collate, tokenize_chat
from drpost.data.sources import BadRowError, load_source, row_to_example

FAST = settings(max_examples=120, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=60, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# values of every kind a YAML file or a typo can produce
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10 ** 12, max_value=10 ** 12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1e-3", "nan", "inf", "true", "null", "auto", "layerwise", "[1, 2]", "a,b"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _is_drpost_error(err: BaseException) -> bool:
    """A clear, specific error raised by drpost's own code (not from deep inside a dependency)."""
    if not isinstance(err, (ValueError, TypeError, ConfigError, BadRowError)):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "/drpost/" in frames[-1].filename.replace("\\", "/") and len(str(err)) > 10


def _expect_clean(fn):
    try:
        return fn()
    except Exception as err:    # noqa: BLE001 - the property is about which exceptions escape
        assert _is_drpost_error(err), f"unclear error {type(err).__name__}: {err}\n{traceback.format_exc()}"
        return err


# ------------------------------------------------------------------------------------ configs
KEYS = valid_keys()


PER_KEY = settings(FAST, max_examples=15)


@pytest.mark.parametrize("key", KEYS)
@PER_KEY
@given(value=values)
def test_any_value_for_any_key_is_accepted_or_a_config_error(key, value):
    section, _, name = key.rpartition(".")
    raw = {section: {name: value}} if section else {name: value}
    try:
        cfg = config_from_dict(raw)
    except ConfigError as err:
        assert key in str(err) or section in str(err), f"{err} does not name {key}"
        return
    _check_trainer_accepts(cfg)


@pytest.mark.parametrize("key", KEYS)
@PER_KEY
@given(text=st.one_of(st.text(max_size=30), st.sampled_from(["0", "-1", "1e9", "nan", "inf", "true", "null", "[]"])))
def test_any_command_line_text_is_accepted_or_a_config_error(key, text):
    assume(not text.startswith("--"))
    try:
        cfg = load_config(None, [f"--{key}", text])
    except ConfigError:
        return
    _check_trainer_accepts(cfg)


@FAST
@given(section=st.sampled_from(list(SECTIONS) + ["", "trian", "drpsot"]),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=15), value=scalars)
def test_unknown_keys_are_refused_by_name(section, key, value):
    full = f"{section}.{key}" if section else key
    assume(full not in KEYS and key not in SECTIONS and "." not in key and (section or key not in KEYS))
    raw = {section: {key: value}} if section else {key: value}
    with pytest.raises(ConfigError, match="unknown config key|must be a mapping"):
        config_from_dict(raw)


@FAST
@given(raw=st.dictionaries(st.sampled_from(list(SECTIONS) + ["output_dir", "run_name", "x"]), values, max_size=4))
def test_whole_random_configs(raw):
    result = _expect_clean(lambda: config_from_dict(raw))
    if not isinstance(result, Exception):
        _check_trainer_accepts(result)


def _check_trainer_accepts(cfg) -> None:
    """A config that validates must not fail later, when the trainer is built from it (the
    arguments drpost.recipes.sft passes to DrPostArguments)."""
    from drpost.integrations import DrPostArguments

    t, r = cfg.train, cfg.drpost
    DrPostArguments(
        output_dir="/nonexistent/fuzz", use_cpu=True, report_to=[], max_steps=t.steps, learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm, seed=t.seed, logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_every else "no", eval_steps=t.eval_every or None,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit, n_target=cfg.data.n_target, **r.trainer_values())
    for f in dataclasses.fields(type(cfg.train)):
        v = getattr(cfg.train, f.name)
        if isinstance(v, float):
            assert math.isfinite(v), f"train.{f.name}={v} passed validation"


# ------------------------------------------------------------------------------------ rows
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\n\t", "\x00", "\ud800", "é" * 50,
                                                         "word " * 400]),
                  st.binary(max_size=12))
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]), st.none(), st.integers())
message = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": texts}),
    st.fixed_dictionaries({"content": texts}),          # missing role
    st.fixed_dictionaries({"role": roles}),             # missing content
    texts, st.none())
rows = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=4), texts, st.none())}),
    st.fixed_dictionaries({"prompt": st.one_of(texts, st.lists(message, max_size=2), st.none()),
                           "completion": st.one_of(texts, st.lists(message, max_size=2), st.none())}),
    st.fixed_dictionaries({"prompt": texts}), st.fixed_dictionaries({"text": texts}),
    st.lists(texts, max_size=2), texts, st.none())


@pytest.fixture(scope="module")
def tokenizer():
    from drpost.models import load_model

    _, tok = load_model("smollm2", num_layers=1)
    return tok


@SLOW
@given(row=rows, max_length=st.sampled_from([None, 8, 24, 64]))
def test_rows_become_examples_or_a_named_error(tokenizer, row, max_length):
    example = _expect_clean(lambda: row_to_example(row, "fuzz", "fuzz:1"))
    if isinstance(example, Exception):
        return
    tok = _expect_clean(lambda: tokenize_chat(example["messages"], tokenizer, max_length=max_length,
                                              system_prompt=""))
    if isinstance(tok, Exception):
        return
    assert len(tok["input_ids"]) == len(tok["labels"]) and (max_length is None or len(tok["input_ids"]) <= max_length)
    assert any(label != -100 for label in tok["labels"]), "a valid example without supervised tokens"
    event("tokenized")
    batch = collate([tok, tok], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape


words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
valid_rows = st.one_of(
    st.builds(lambda p, c: {"prompt": p, "completion": c}, words, words),
    st.builds(lambda s, u, a: {"messages": [{"role": "system", "content": s}, {"role": "user", "content": u},
                                            {"role": "assistant", "content": a}]}, words, words,
              st.one_of(words, st.just("word " * 300))))


@SLOW
@given(row=valid_rows, max_length=st.sampled_from([None, 16, 48]))
def test_wellformed_rows_with_any_text_tokenize_or_are_too_long(tokenizer, row, max_length):
    """Well-formed rows with arbitrary text (empty, whitespace, emoji, very long): an example with
    supervised assistant tokens, or a specific error (empty content, too long for max_length)."""
    from drpost.data.chat import SequenceTooLongError

    example = _expect_clean(lambda: row_to_example(row, "fuzz", "fuzz:1"))
    if isinstance(example, Exception):
        assert "empty" in str(example), example
        return
    try:
        tok = tokenize_chat(example["messages"], tokenizer, max_length=max_length, system_prompt="")
    except SequenceTooLongError as err:
        assert max_length is not None and f"max_length={max_length}" in str(err)
        return
    assert any(label != -100 for label in tok["labels"])
    assert max_length is None or len(tok["input_ids"]) <= max_length
    event("tokenized")


@SLOW
@given(lines=st.lists(st.one_of(st.binary(max_size=30), rows.map(lambda r: json.dumps(r, default=repr).encode()),
                                st.just(b'{"prompt": "hi", "completion": "there"}'), st.just(b"\xff\xfe\x00")),
                      max_size=5),
       on_bad_row=st.sampled_from(["error", "skip"]))
def test_jsonl_files_load_or_name_the_bad_line(tmp_path_factory, lines, on_bad_row):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    out = _expect_clean(lambda: load_source(path, on_bad_row=on_bad_row))
    if isinstance(out, Exception):
        assert isinstance(out, BadRowError) and str(path) in str(out), out
    else:
        event("loaded")
        assert out and all(ex["messages"][-1]["role"] == "assistant" for ex in out)


# ------------------------------------------------------------------------------------ batches
@SLOW
@given(b=st.integers(1, 4), seq=st.integers(0, 12), pad_rows=st.integers(0, 4), supervised=st.booleans(),
       fset=st.sampled_from(["layerwise", "global", "standard", "target_only", "rowwise"]),
       dtype=st.sampled_from([torch.long, torch.int32, torch.float32]))
def test_engine_batches_step_or_raise_a_clear_error(b, seq, pad_rows, supervised, fset, dtype):
    """Zero-length sequences, all-padding rows and batches, batches without supervised tokens and
    wrong dtypes: a normal step with finite gradients, or a drpost ValueError/TypeError."""
    torch.manual_seed(0)
    general = {k: v[:, :seq] for k, v in mt.make_batch(b, 12, seed=seq).items()}   # seq 0: zero-length rows
    for i in range(min(pad_rows, b)):       # all-padding rows: attention 0, labels -100
        general["attention_mask"][i] = 0
        general["labels"][i] = -100
        general["input_ids"][i] = mt.PAD_ID
    if not supervised:
        general["labels"][:] = -100
    general["input_ids"] = general["input_ids"].to(dtype)
    target = mt.make_batch(2, 6, seed=1)
    model = mt.tiny_lm(seed=0)
    reg = DataRegularizer(model, feasible_set=fset, frac=0.5, pad_token_id=mt.PAD_ID)
    try:
        result = _expect_clean(lambda: reg.backward(general, target))
        event("error" if isinstance(result, Exception) else "step")
        if not isinstance(result, Exception):
            assert not result.skipped
            for n, p in model.named_parameters():
                assert p.grad is None or bool(torch.isfinite(p.grad).all()), n
    finally:
        reg.detach()
