"""Tasks, local sources and recipe splits: determinism, disjointness, malformed rows, over-long rows."""

import json
import logging

import pytest

from drpost.config import DataConfig
from drpost.data.chat import validate_messages
from drpost.data.sources import BadRowError, load_source
from drpost.data.splits import ChatTokenizer, build_sft_data, mixture_counts
from drpost.data.tasks import TASKS, get_task, task_examples, task_names, task_split


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from drpost.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


def small_data(**kw):
    base = dict(
        target={"task": "bbc_headline", "sections": ["tech"]}, n_target=8, test_size=20,
        general=[{"task": "bbc_headline", "weight": 1}, {"task": "bbc_category", "weight": 1},
                 {"task": "chatterbot_qa", "weight": 1}, {"task": "bbc_continuation", "weight": 1}],
        n_general=60, max_seq_length=112, seed=0)
    base.update(kw)
    return DataConfig(**base)


# ------------------------------------------------------------------------------------ tasks
def test_registry_tasks_examples_and_metrics():
    assert {"bbc_headline", "bbc_category", "bbc_continuation", "bbc_lead", "chatterbot_qa"} <= set(task_names())
    assert get_task("bbc_category").metrics == ("exact_match",)
    assert get_task("chatterbot_qa").metrics == ("token_f1",)
    assert get_task("bbc_headline").metrics == ("rougeL",)
    for name in task_names():
        task = TASKS[name]
        assert task.max_new_tokens >= 1
        exs = task_examples(name)
        assert len(exs) > 100
        for ex in exs[:50]:
            assert ex["kind"] == name and isinstance(ex["source"], str)
            msgs = validate_messages(ex["messages"])
            assert [m["role"] for m in msgs] == ["user", "assistant"]
    cats = task_examples({"task": "bbc_category", "sections": ["sport", "tech"]})
    assert {ex["messages"][1]["content"] for ex in cats} == {"sport", "tech"}
    with pytest.raises(ValueError, match="did you mean 'bbc_headline'"):
        get_task("bbc_headlines")
    with pytest.raises(ValueError, match="unknown section"):
        task_examples({"task": "bbc_headline", "sections": ["weather"]})
    with pytest.raises(ValueError, match="unknown key 'section'"):
        task_examples({"task": "bbc_headline", "section": "tech"})


def test_task_split_deterministic_and_disjoint_by_source():
    a = task_split({"task": "bbc_headline", "sections": ["tech"]}, test_size=50, seed=3)
    b = task_split({"task": "bbc_headline", "sections": ["tech"]}, test_size=50, seed=3)
    c = task_split({"task": "bbc_headline", "sections": ["tech"]}, test_size=50, seed=4)
    assert [e["source"] for e in a.train] == [e["source"] for e in b.train]
    assert [e["source"] for e in a.test] == [e["source"] for e in b.test]
    assert {e["source"] for e in a.test} != {e["source"] for e in c.test}
    assert len(a.test) == 50 and a.test_sources == {e["source"] for e in a.test}
    assert not a.test_sources & {e["source"] for e in a.train}
    # duplicated BBC articles are removed: no headline on both sides
    assert not {e["messages"][1]["content"] for e in a.test} & {e["messages"][1]["content"] for e in a.train}
    with pytest.raises(ValueError, match="too few"):
        task_split({"task": "bbc_headline", "sections": ["tech"]}, test_size=10_000)


def test_chatterbot_split_keeps_a_question_on_one_side_with_all_its_answers():
    s = task_split({"task": "chatterbot_qa", "topics": ["ai"]}, test_size=20, seed=0)
    norm = lambda q: " ".join(q.lower().replace("?", " ").split())  # noqa: E731
    test_q = {norm(e["messages"][0]["content"]) for e in s.test}
    assert not test_q & {norm(e["messages"][0]["content"]) for e in s.train}
    answers = {}
    for e in task_examples({"task": "chatterbot_qa", "topics": ["ai"]}):
        answers.setdefault(e["source"], []).append(e["messages"][1]["content"])
    for e in s.test:  # one test row per question, every answer of it as a reference
        assert e["references"] == list(dict.fromkeys(answers[e["source"]]))
    assert len(s.test) == len({e["source"] for e in s.test})
    assert any(len(refs) > 1 for refs in answers.values())


# ------------------------------------------------------------------------------------ splits
def test_build_sft_data_deterministic_and_disjoint(tokenizer):
    d1 = build_sft_data(small_data(), tokenizer)
    d2 = build_sft_data(small_data(), tokenizer)
    d3 = build_sft_data(small_data(seed=1), tokenizer)
    for name in ("target", "test", "general"):
        assert getattr(d1, name)["input_ids"] == getattr(d2, name)["input_ids"]
    assert d1.target["source"] != d3.target["source"]
    assert len(d1.target) == 8 and len(d1.test) == 20 and len(d1.general) == 60
    assert d1.stats["general_kinds"] == {"bbc_category": 15, "bbc_continuation": 15, "bbc_headline": 15,
                                         "chatterbot_qa": 15}
    target, test = set(d1.target["source"]), set(d1.test["source"])
    assert not target & test
    assert not set(d1.general["source"]) & (target | test)  # no target/test article in any general task
    tech_headlines = [(k, s) for k, s in zip(d1.general["kind"], d1.general["source"])
                      if k == "bbc_headline" and s.startswith("bbc/tech/")]
    assert tech_headlines == []  # the target task itself is excluded from the pool
    assert [ex["source"] for ex in d1.test_examples] == d1.test["source"]
    for row in d1.general:
        assert len(row["input_ids"]) <= 112 and any(l != -100 for l in row["labels"])


def test_target_share_puts_train_split_examples_in_the_pool(tokenizer):
    d = build_sft_data(small_data(target_share=0.25, general=[{"task": "bbc_category", "weight": 1}]), tokenizer)
    target_like = [s for k, s in zip(d.general["kind"], d.general["source"]) if k == "bbc_headline"]
    assert len(target_like) == 15 and d.stats["general_target_like"] == 15 and len(d.general) == 60
    assert all(s.startswith("bbc/tech/") for s in target_like)
    assert not set(target_like) & (set(d.target["source"]) | set(d.test["source"]))


def test_split_errors(tokenizer):
    with pytest.raises(ValueError, match="data.n_target = 500"):
        build_sft_data(small_data(n_target=500), tokenizer)
    with pytest.raises(ValueError, match="is the target task itself"):
        build_sft_data(small_data(general=[{"task": "bbc_headline", "sections": ["tech"], "weight": 1}]), tokenizer)
    with pytest.raises(ValueError, match="usable examples but 5000 are requested"):
        build_sft_data(small_data(general=[{"task": "bbc_lead", "sections": ["tech"], "count": 5000}],
                                  n_general=None), tokenizer)
    assert mixture_counts([{"count": 10}, {"weight": 1}, {"weight": 2}], 40) == [10, 10, 20]
    assert mixture_counts([{"weight": 1}, {"weight": 1}, {"weight": 1}], 10) == [4, 3, 3]


def test_overlong_truncate_and_drop_counts(tokenizer):
    long_prompt = " ".join(["word"] * 200)
    exs = [{"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "short"}],
            "kind": "k", "source": "a"},
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "kind": "k", "source": "b"},
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " ".join(["x"] * 300)}],
            "kind": "k", "source": "c"}]
    trunc = ChatTokenizer(tokenizer, 64, "truncate")
    rows, raw = trunc.take(exs, None, "general")
    assert [r["source"] for r in rows] == ["a", "b"]  # c: the reply alone does not fit
    assert trunc.truncated == {"general": 1} and trunc.dropped == {"general": 1}
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    drop = ChatTokenizer(tokenizer, 64, "drop")
    rows, _ = drop.take(exs, None, "general")
    assert [r["source"] for r in rows] == ["b"] and drop.dropped == {"general": 2} and not drop.truncated

    d_drop = build_sft_data(small_data(max_seq_length=96, overlong="drop"), tokenizer)
    d_trunc = build_sft_data(small_data(max_seq_length=96, overlong="truncate"), tokenizer)
    assert sum(d_drop.stats["dropped"].values()) > 0 and not d_drop.stats["truncated"]
    assert sum(d_trunc.stats["truncated"].values()) > 0
    assert len(d_drop.target) == len(d_trunc.target) == 8  # the target is filled with usable rows
    for d in (d_drop, d_trunc):
        assert max(len(x) for x in d.general["input_ids"]) <= 96


# ------------------------------------------------------------------------------------ sources
def _msgs(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_sources_formats(tmp_path):
    import datasets

    jl = tmp_path / "chat.jsonl"
    jl.write_text("\n".join(json.dumps({"messages": _msgs(f"q{i}", f"a{i}")}) for i in range(5)) + "\n\n")
    exs = load_source(jl)
    assert len(exs) == 5 and exs[0]["kind"] == "chat" and exs[2]["source"] == "chat:3"
    assert exs[4]["messages"][1]["content"] == "a4"

    js = tmp_path / "pc.json"
    js.write_text(json.dumps([{"prompt": "p1", "completion": "c1", "source": "doc-1"},
                              {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "p2"}],
                               "completion": [{"role": "assistant", "content": "c2"}]}]))
    exs = load_source(js, kind="mine")
    assert exs[0]["messages"] == _msgs("p1", "c1") and exs[0]["source"] == "doc-1" and exs[0]["kind"] == "mine"
    assert [m["role"] for m in exs[1]["messages"]] == ["system", "user", "assistant"]

    pq = tmp_path / "pc.parquet"
    datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]).to_parquet(str(pq))
    exs = load_source(pq)
    assert [e["messages"] for e in exs] == [_msgs(f"p{i}", f"c{i}") for i in range(4)]

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"messages": _msgs(f"q{i}", f"a{i}")} for i in range(3)]).save_to_disk(str(saved))
    assert [e["messages"] for e in load_source(saved)] == [_msgs(f"q{i}", f"a{i}") for i in range(3)]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": _msgs("a", "b")}]),
                          "test": datasets.Dataset.from_list([{"messages": _msgs("c", "d")}])}).save_to_disk(str(dd))
    assert load_source(dd)[0]["messages"] == _msgs("a", "b")
    assert load_source(dd, split="test")[0]["messages"] == _msgs("c", "d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(tmp_path / "missing.jsonl")


BAD_ROWS = [
    ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "message 0 has no 'role'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant reply"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}, r"message 0 \(user\): empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "must be a string"),
    ({"messages": "q: a"}, "non-empty list"),
    ({"prompt": "q"}, "no 'completion'"),
    ({"text": "q"}, "no 'messages' column"),
    ([1, 2], "must be an object"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_malformed_row_errors_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": _msgs("q", "a")})
    path.write_text(good + "\n" + good + "\n" + json.dumps(row) + "\n")
    with pytest.raises(BadRowError, match=message) as err:
        load_source(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_non_utf8_invalid_json_and_skip(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"messages": _msgs("q", "a")}).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n' + b"{not json\n" + good + b"\n")
    with pytest.raises(BadRowError, match=r"line 2: not valid UTF-8"):
        load_source(path)
    with caplog.at_level(logging.WARNING, logger="drpost.data"):
        exs = load_source(path, on_bad_row="skip")
    assert len(exs) == 2 and [e["source"] for e in exs] == ["mixed:1", "mixed:4"]
    assert "skipped 2 malformed row(s) of 4" in caplog.text and "invalid JSON" in caplog.text
    js = tmp_path / "bad.json"
    js.write_text(json.dumps([{"messages": _msgs("q", "a")}, {"messages": _msgs("q", "a")[:1]}]))
    with pytest.raises(BadRowError, match=r"bad.json: row 2: .*assistant"):
        load_source(js)
    pq = tmp_path / "bad.parquet"
    import datasets

    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]).to_parquet(
        str(pq))
    with pytest.raises(BadRowError, match=r"bad.parquet: row 2: .*no 'completion'"):
        load_source(pq)


def test_local_source_as_target_and_general_entry(tmp_path, tokenizer):
    path = tmp_path / "faq.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Question number {i}?", "completion": f"Answer {i}."})
                              for i in range(40)) + "\n" + '{"prompt": "broken"}\n')
    cfg = small_data(target={"source": str(path), "metrics": ["f1"], "max_new_tokens": 8}, n_target=8, test_size=10,
                     general=[{"task": "bbc_category", "weight": 1}], n_general=20, on_bad_row="skip")
    d = build_sft_data(cfg, tokenizer)
    assert len(d.target) == 8 and len(d.test) == 10 and d.task.metrics == ("f1",) and d.task.max_new_tokens == 8
    assert not set(d.target["source"]) & set(d.test["source"])
    with pytest.raises(BadRowError, match="line 41"):
        build_sft_data(small_data(target={"source": str(path)}, test_size=10), tokenizer)
    cfg = small_data(general=[{"source": str(path), "count": 25, "on_bad_row": "skip"}], n_general=None)
    d = build_sft_data(cfg, tokenizer)
    assert d.stats["general_kinds"] == {"faq": 25}
