"""drpost.evaluation: metrics against hand-computed values, perplexity against a per-example
loop, greedy generation (determinism, left padding, stopping, train/eval prompt agreement)."""
import math

import pytest
import torch
import torch.nn.functional as F

import models_tiny
from drpost.data.chat import IGNORE_INDEX, tokenize_chat, tokenize_examples
from drpost.evaluation import (
    encode_prompts,
    evaluate_task,
    exact_match,
    generate,
    generate_ids,
    normalize_answer,
    perplexity,
    rouge,
    stop_token_ids,
    token_f1,
)

from drpost.models import load_model


# --------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def real1():
    """The 1-layer truncated SmolLM2-135M-Instruct (real weights) and its tokenizer (a model that
    does not load fails these tests, never skips them)."""
    return load_model("smollm2", num_layers=1)


@pytest.fixture(scope="module")
def tokenizer(real1):
    return real1[1]


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    """A randomly initialised float64 Llama over the real SmolLM2 vocabulary: its greedy outputs
    differ from prompt to prompt, so padding mistakes would show."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.5, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(123)
    return LlamaForCausalLM(cfg).double().eval()


def _chat(q, a=None):
    msgs = [{"role": "user", "content": q}]
    return msgs + ([{"role": "assistant", "content": a}] if a is not None else [])


PROMPTS = [
    "hi",
    "What is the capital of France? Answer in one word.",
    "Summarise: the committee met on Tuesday and agreed to postpone the vote until the budget is known.",
    "ok",
]


def naive_greedy(model, prompt_ids, max_new_tokens, stops):
    """One prompt, no padding, no KV cache: the full sequence is recomputed at every step."""
    ids, new = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in stops:
                break
            ids.append(nxt)
            new.append(nxt)
    return new


# --------------------------------------------------------------------------------------------
# metrics

def test_normalize_answer():
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_token_f1_by_hand():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; 2 common tokens:
    # P = 2/2 = 1, R = 2/3, F1 = 2 * 1 * (2/3) / (1 + 2/3) = (4/3) / (5/3) = 0.8
    assert token_f1(["the cat sat"], ["a cat sat down"]) == pytest.approx(0.8)
    # no overlap -> 0; repeated tokens count with multiplicity: [cat, cat] vs [cat] -> P 1/2, R 1, F1 2/3
    assert token_f1(["dog"], ["cat"]) == 0.0
    assert token_f1(["cat cat"], ["cat"]) == pytest.approx(2 / 3)
    # mean over examples: (0.8 + 0 + 1) / 3
    assert token_f1(["the cat sat", "dog", "Paris."], ["a cat sat down", "cat", "paris"]) == pytest.approx(1.8 / 3)
    # SQuAD v2 convention for empty answers (after normalisation "the" is empty)
    assert token_f1(["the"], ["a"]) == 1.0 and token_f1([""], ["x"]) == 0.0
    # several references: the best one counts
    assert token_f1(["cat sat"], [["dog", "the cat sat"]]) == 1.0


def test_exact_match_normalisation():
    assert exact_match(["The Cat!"], ["cat"]) == 1.0
    assert exact_match(["  an   answer. "], ["Answer"]) == 1.0
    assert exact_match(["cats"], ["cat"]) == 0.0
    assert exact_match(["Paris", "London", "Rome"], ["paris", "Berlin", ["Madrid", "rome."]]) == pytest.approx(2 / 3)


def test_rouge_by_hand():
    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    # ROUGE-1: unigram overlap the x2, cat, on, mat = 5 of 6 on both sides -> P = R = F = 5/6
    # ROUGE-2: bigrams the-cat, on-the, the-mat shared = 3 of 5 -> 0.6
    # ROUGE-L: LCS "the cat on the mat" = 5 -> 5/6
    r = rouge([pred], [ref])
    assert set(r) == {"rouge1", "rouge2", "rougeL"}
    assert r["rouge1"] == pytest.approx(5 / 6)
    assert r["rouge2"] == pytest.approx(0.6)
    assert r["rougeL"] == pytest.approx(5 / 6)
    # stemming is on: running -> run, dogs -> dog
    assert rouge(["running dogs"], ["run dog"])["rouge1"] == pytest.approx(1.0)
    # mean over examples: (1 + 0) / 2
    assert rouge(["a b", "x"], ["a b", "y"])["rouge1"] == pytest.approx(0.5)
    # ROUGE-1 with unequal lengths: "cat" vs "the cat sat": P = 1, R = 1/3, F = 2 * (1/3) / (4/3) = 0.5
    assert rouge(["cat"], ["the cat sat"])["rouge1"] == pytest.approx(0.5)


@pytest.mark.parametrize("fn", [rouge, exact_match, token_f1])
def test_metric_errors(fn):
    with pytest.raises(ValueError, match="at least one"):
        fn([], [])
    with pytest.raises(ValueError, match="mismatch"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="list"):
        fn("abc", "abc")


# --------------------------------------------------------------------------------------------
# perplexity

def _naive_loss(model, examples):
    """Per-example forward without padding; sum of token CEs over supervised tokens / count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1]
            keep = labels != IGNORE_INDEX
            total += float(F.cross_entropy(logits[keep].double(), labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count, count


def _tiny_examples():
    g = torch.Generator().manual_seed(5)
    out = []
    for i, (n, p) in enumerate([(12, 3), (5, 1), (9, 7), (3, 0), (16, 2), (7, 5), (4, 2)]):
        ids = torch.randint(3, models_tiny.VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def test_perplexity_matches_per_example_loop():
    model = models_tiny.llama(seed=3)
    examples = _tiny_examples()  # unequal lengths and prompt lengths -> padding in every batch
    loss, count = _naive_loss(model, examples)
    model.train()
    res = perplexity(model, examples, batch_size=3, pad_id=models_tiny.PAD_ID)
    assert model.training  # mode restored
    assert res["tokens"] == count == sum(len(e["input_ids"]) - max(1, sum(l == IGNORE_INDEX for l in e["labels"]))
                                         for e in examples)
    assert res["loss"] == pytest.approx(loss, rel=1e-10)
    assert res["ppl"] == pytest.approx(math.exp(loss), rel=1e-10)
    # batch size (and so the padding) does not matter, nor does the pad id, nor ready-made batches
    assert perplexity(model, examples, batch_size=1)["loss"] == pytest.approx(loss, rel=1e-10)
    assert perplexity(model, examples, batch_size=7, pad_id=17)["loss"] == pytest.approx(loss, rel=1e-10)
    from drpost.data.chat import collate
    batches = [collate(examples[:4], 0), collate(examples[4:], 0)]
    assert perplexity(model, batches)["loss"] == pytest.approx(loss, rel=1e-10)
    assert perplexity(model, batches[0])["tokens"] == _naive_loss(model, examples[:4])[1]
    # it is the token mean, not the mean of per-batch means (which differs here)
    means = [_naive_loss(model, examples[i:i + 3])[0] for i in range(0, len(examples), 3)]
    assert abs(sum(means) / len(means) - loss) > 1e-3


def test_perplexity_bare_logits_model_and_autocast():
    model = models_tiny.tiny_lm(seed=1)  # returns a logits tensor, not an HF output
    examples = _tiny_examples()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex["input_ids"]]))[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    res = perplexity(model, examples, batch_size=4)
    assert res["loss"] == pytest.approx(total / count, rel=1e-10) and res["tokens"] == count
    fp32 = models_tiny.llama(seed=3).float()
    ref = perplexity(fp32, examples)["loss"]
    bf16 = perplexity(fp32, examples, autocast_dtype=torch.bfloat16)["loss"]
    assert bf16 == pytest.approx(ref, rel=5e-2)


def test_perplexity_errors():
    model = models_tiny.llama(seed=3)
    with pytest.raises(ValueError, match="at least one"):
        perplexity(model, [])
    with pytest.raises(ValueError, match="tokenise"):
        perplexity(model, [{"messages": _chat("q", "a")}])
    with pytest.raises(ValueError, match="no supervised tokens"):
        perplexity(model, [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}])


def test_evaluate_task_ppl_uses_training_labels(tokenizer, tiny_llama):
    examples = [{"messages": _chat(q, a)} for q, a in
                [("hi", "Hello!"), ("What is two plus two?", "Four."), ("Name a colour.", "Blue, or maybe green.")]]
    tokenized = tokenize_examples(examples, tokenizer, system_prompt="")
    loss, count = _naive_loss(tiny_llama, tokenized)
    res = evaluate_task(tiny_llama, tokenizer, examples, metrics=("ppl",), batch_size=2, system_prompt="")
    assert res["n"] == 3 and res["tokens"] == count and res["ppl_examples"] == 3
    assert res["loss"] == pytest.approx(loss, rel=1e-10)
    assert res["ppl"] == pytest.approx(math.exp(loss), rel=1e-10)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_task(tiny_llama, tokenizer, examples, metrics=("bleu",))
    with pytest.raises(ValueError, match="example 0"):
        evaluate_task(tiny_llama, tokenizer, [_chat("no reply")], metrics=("ppl",))


# --------------------------------------------------------------------------------------------
# generation

def test_prompts_are_encoded_as_in_training(tokenizer):
    msgs = _chat("Write a headline:\nText.", "Headline")
    for system_prompt in ("", None, "Be brief."):
        train = tokenize_chat(msgs, tokenizer, system_prompt=system_prompt)
        (prompt,) = encode_prompts(tokenizer, [msgs], system_prompt=system_prompt)
        assert train["input_ids"][: len(prompt)] == prompt       # same tokens, no extra BOS
        assert train["labels"][len(prompt)] != IGNORE_INDEX      # the reply starts right after
        assert all(lab == IGNORE_INDEX for lab in train["labels"][: len(prompt)])
    # a string is one user turn; a dict with "messages" and a reply-less list are accepted too
    a = encode_prompts(tokenizer, ["Write a headline:\nText.", {"messages": msgs}, msgs[:1], [5, 6]])
    assert a[0] == a[1] == a[2] and a[3] == [5, 6]
    with pytest.raises(ValueError, match="list of conversations"):
        encode_prompts(tokenizer, msgs)


def test_stop_tokens(tokenizer):
    stops = stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert tokenizer.eos_token_id in stops


def test_generation_deterministic_and_greedy(real1):
    model, tok = real1
    # a sampling generation config on the checkpoint must not leak into evaluation (METHOD §9.16)
    saved = model.generation_config
    model.generation_config = type(saved)(**{**saved.to_dict(), "do_sample": True, "temperature": 5.0, "top_k": 0})
    model.train()
    side = tok.padding_side
    try:
        a = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, progress=False, system_prompt="")
        b = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=2, progress=False, system_prompt="")
        assert a == b and len(a) == len(PROMPTS) and all(isinstance(s, str) for s in a)
        assert model.training and tok.padding_side == side            # restored
        assert model.generation_config.do_sample is True               # restored, not modified
        ids = generate_ids(model, tok, PROMPTS, max_new_tokens=8, progress=False, system_prompt="")
        stops = set(stop_token_ids(tok))
        model.eval()
        for prompt, row in zip(encode_prompts(tok, PROMPTS, system_prompt=""), ids):
            assert row == naive_greedy(model, prompt, 8, stops)
    finally:
        model.generation_config = saved
        model.eval()


def test_left_padding_alone_equals_batched(real1, tiny_llama):
    _, tok = real1
    for model in (real1[0], tiny_llama):
        short = PROMPTS[0]
        alone = generate_ids(model, tok, [short], max_new_tokens=10, progress=False, system_prompt="")
        batched = generate_ids(model, tok, PROMPTS, max_new_tokens=10, batch_size=8, progress=False,
                               system_prompt="")
        assert batched[0] == alone[0]
        # every row equals its own unpadded, cache-free greedy decode
        stops = set(stop_token_ids(tok))
        for prompt, row in zip(encode_prompts(tok, PROMPTS, system_prompt=""), batched):
            assert row == naive_greedy(model, prompt, 10, stops)
    # the random model's continuations depend on the prompt, so the check above is not vacuous
    assert len({tuple(r) for r in batched}) > 1
    # a tokenizer without a pad token is padded by hand, with the same result
    pad = tok.pad_token
    tok.pad_token = None
    try:
        assert tok.pad_token_id is None
        assert generate_ids(tiny_llama, tok, PROMPTS, max_new_tokens=10, progress=False, system_prompt="") == batched
    finally:
        tok.pad_token = pad
    assert tok.pad_token_id is not None


def test_max_new_tokens_and_stop_at_end_of_turn(real1):
    model, tok = real1
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = generate_ids(model, tok, PROMPTS, max_new_tokens=5, progress=False, system_prompt="")
    assert all(len(r) <= 5 for r in ids) and max(len(r) for r in ids) == 5
    free = generate_ids(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2, progress=False, system_prompt="")
    assert [len(r) for r in free] == [6, 6]  # this truncated model does not end its turn by itself

    # Force <|im_end|> as the 3rd new token of the first row only: that row stops after 2 tokens
    # (the stop token is not returned), the other row runs on to max_new_tokens unchanged.
    calls = {"n": 0}

    def force_end(module, inputs, out):
        calls["n"] += 1
        if calls["n"] == 3:  # prefill -> token 1, decode step 1 -> token 2, step 2 -> token 3
            out = out.clone()
            out[0, -1, im_end] = out[0, -1].max() + 100.0
            return out

    handle = model.lm_head.register_forward_hook(force_end)
    try:
        stopped = generate_ids(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2, progress=False,
                               system_prompt="")
        calls["n"] = 0
        text = generate(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2, progress=False, system_prompt="")
    finally:
        handle.remove()
    # generate_ids sorts longest-first, so PROMPTS[1] is row 0 of the padded batch
    assert stopped[1] == free[1][:2] and stopped[0] == free[0]
    assert all("<|im_end|>" not in s and s == s.strip() for s in text)


def test_natural_end_of_turn_and_first_line_full_model(tokenizer):
    """The full instruct model ends its reply with <|im_end|> well before max_new_tokens."""
    model, tok = load_model("smollm2")
    out = generate_ids(model, tok, ["hi"], max_new_tokens=24, progress=False, system_prompt="")[0]
    assert 0 < len(out) < 24
    prompt = encode_prompts(tok, ["hi"], system_prompt="")[0]
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax())
    assert nxt in stop_token_ids(tok)
    text = generate(model, tok, ["hi"], max_new_tokens=24, progress=False, system_prompt="")[0]
    assert text and text == tok.decode(out, skip_special_tokens=True).strip()
    # first_line keeps the text before the first newline (this reply runs on after a blank line)
    q = ["What is 2+2?"]
    raw = generate(model, tok, q, max_new_tokens=10, progress=False, system_prompt="")[0]
    first = generate(model, tok, q, max_new_tokens=10, progress=False, system_prompt="", first_line=True)[0]
    assert "\n" in raw and first == raw.split("\n", 1)[0].strip() and first


def test_evaluate_task_text_metrics(real1):
    model, tok = real1
    examples = [{"messages": _chat(q, a)} for q, a in [("hi", "Hello!"), ("2+2?", "4")]]
    res = evaluate_task(model, tok, examples, metrics=("ppl", "rouge", "em", "f1"), max_new_tokens=4,
                        progress=False, system_prompt="", return_predictions=True)
    assert set(res) >= {"n", "loss", "ppl", "tokens", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1",
                        "predictions", "references"}
    assert res["references"] == ["Hello!", "4"]
    assert res["predictions"] == generate(model, tok, examples, max_new_tokens=4, progress=False, system_prompt="")
    for key in ("rouge1", "rouge2", "rougeL", "exact_match", "token_f1"):
        assert 0.0 <= res[key] <= 1.0
