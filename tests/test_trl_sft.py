"""DrPostSFTTrainer (TRL SFTTrainer integration): the real SmolLM2 tokenizer and chat template, a tiny
float64 Llama with the tokenizer's vocabulary.

The references are stock ``trl.SFTTrainer`` runs with the same arguments, seed and data:
``feasible_set="standard"`` and ``frac=1`` must reproduce them step for step (padded and padding-free
batches, LoRA through ``peft_config``, gradient accumulation); a padding-free layerwise run must equal
the padded one (the same sequences are the same samples); a resumed run must equal the uninterrupted
one; two ranks under torchrun must equal one process on the concatenated batch.
"""
import glob
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "red", "green", "blue",
         "cat", "dog", "bird", "tree", "river", "stone", "cloud"]


def tokenizer():
    from transformers import AutoTokenizer

    from drpost.models import smollm2_path
    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


def tiny_model(vocab: int, seed: int = 0):
    """1-layer float64 Llama with the real vocabulary (untied), deterministic; sdpa attention and
    :func:`models_tiny.exact_rmsnorm`, since HF's eager softmax and RMSNorm compute in float32."""
    import models_tiny as mt
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=2, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.15, attn_implementation="sdpa")
    return mt._finish(mt.exact_rmsnorm(LlamaForCausalLM(cfg)), seed)


def ds(rows):
    from datasets import Dataset
    return Dataset.from_list(rows)


def prompt_completion(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=g))
        k = int(torch.randint(1, 4, (1,), generator=g))
        rows.append({"prompt": f"Repeat {a} {k} times:", "completion": " " + " ".join([a] * k) + f" then {b}"})
    return rows


def messages(n: int, seed: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in prompt_completion(n, seed)]


def config_kw(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                learning_rate=1e-2, max_steps=3, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                dataloader_num_workers=0, bf16=False, gradient_checkpointing=False, max_length=64,
                dataset_num_proc=None)
    base.update(kw)
    return base


def float64_causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """SFTTrainer's nll loss (shifted token sum / tokens of the accumulated step) in the model's float64:
    SFTTrainer's default fused LM-head kernel computes the log-probs in float32."""
    logits, labels = outputs.logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss / num_items_in_batch


def stock_run(tmp_path, tok, name="stock", general=None, peft_config=None, float64=True, **kw):
    """Stock SFTTrainer; ``float64``: with the float64 loss above (else its float32 fused kernel)."""
    import warnings

    from trl import SFTConfig, SFTTrainer

    model = tiny_model(len(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # compute_loss_func is deprecated in TRL 1.16
        t = SFTTrainer(model=model, args=SFTConfig(**config_kw(tmp_path, name, **kw)), processing_class=tok,
                       train_dataset=ds(general if general is not None else prompt_completion(24, 1)),
                       peft_config=peft_config, compute_loss_func=float64_causal_lm_loss if float64 else None)
    t.train()
    return t, params_of(t.model)


def drpost_run(tmp_path, tok, name="dr", general=None, target="default", peft_config=None, resume=None, **kw):
    from drpost.integrations import DrPostSFTConfig, DrPostSFTTrainer

    kw.setdefault("target_batch_size", 2)
    model = tiny_model(len(tok))
    t = DrPostSFTTrainer(model=model, args=DrPostSFTConfig(**config_kw(tmp_path, name, **kw)), processing_class=tok,
                         train_dataset=ds(general if general is not None else prompt_completion(24, 1)),
                         target_dataset=messages(16, 2) if target == "default" else target, peft_config=peft_config)
    t.train(resume_from_checkpoint=resume)
    return t, params_of(t.model)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_close(a, b, rtol=1e-9, atol=1e-11):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def changed(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


def train_logs(trainer):
    return [r for r in trainer.state.log_history if "loss" in r]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def stock(tmp_path_factory, tok):
    return stock_run(tmp_path_factory.mktemp("stock"), tok)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feasible_set,frac", [("standard", 0.5), ("layerwise", 1.0)])
def test_equals_stock_sft_trainer(tmp_path, tok, stock, feasible_set, frac):
    ref_trainer, ref = stock
    t, got = drpost_run(tmp_path, tok, feasible_set=feasible_set, frac=frac)
    assert changed(params_of(tiny_model(len(tok))), got) == set(got)      # every weight moved
    assert_params_close(got, ref)
    losses = [r["loss"] for r in train_logs(t)]
    assert losses == pytest.approx([r["loss"] for r in train_logs(ref_trainer)], rel=1e-6)
    assert [r["num_tokens"] for r in train_logs(t)] == [r["num_tokens"] for r in train_logs(ref_trainer)]
    assert all(r["general_loss"] == pytest.approx(r["loss"], rel=1e-6) for r in train_logs(t))


def test_equals_stock_sft_trainer_with_its_fused_kernel(tmp_path, tok):
    """Stock SFTTrainer as users run it (its float32 fused LM-head kernel): equal to float32 precision
    (AdamW's first steps amplify the rounding of near-zero gradients to ~1e-5 of a weight)."""
    ref_trainer, ref = stock_run(tmp_path, tok, "stock-fused", float64=False)
    t, got = drpost_run(tmp_path, tok, feasible_set="standard")
    assert_params_close(got, ref, rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in train_logs(t)] == pytest.approx([r["loss"] for r in train_logs(ref_trainer)],
                                                               rel=1e-6)


def test_layerwise_selects_and_trains_on_chat_target(tmp_path, tok):
    t, got = drpost_run(tmp_path, tok, frac=0.5, general=messages(24, 3))
    logs = train_logs(t)
    assert len(logs) == 3 and all(r["selected_mean"] == 2 for r in logs)      # k = 4 * 0.5 per layer
    assert all(r["target_loss"] > 0 for r in logs)
    # the target rows went through the processing class's chat template
    text = tok.decode(t.target_dataset[0]["input_ids"])
    assert "<|im_start|>user\nRepeat" in text and "<|im_start|>assistant\n" in text


def test_completion_only_labels_of_prompt_completion_target(tmp_path, tok):
    t = _build(tmp_path, tok, prompt_completion(16, 2))
    for row in t.target_dataset:
        supervised = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
        assert "Repeat" not in supervised and supervised.endswith("<|im_end|>"), supervised


def test_padding_free_equals_padded(tmp_path, tok):
    """The same sequences, packed into one row, are the same samples: stock padding-free equals drpost
    standard padding-free, and drpost layerwise padding-free equals drpost layerwise padded."""
    free = dict(padding_free=True, max_length=None)
    ref_trainer, ref = stock_run(tmp_path, tok, "stock-free", **free)
    _, got = drpost_run(tmp_path, tok, "std-free", feasible_set="standard", **free)
    assert_params_close(got, ref)
    t_free, layer_free = drpost_run(tmp_path, tok, "lw-free", frac=0.5, **free)
    t_pad, layer_pad = drpost_run(tmp_path, tok, "lw-pad", frac=0.5, max_length=None)
    assert_params_close(layer_free, layer_pad, rtol=1e-8, atol=1e-10)
    for a, b in zip(train_logs(t_free), train_logs(t_pad)):
        assert a["selected_mean"] == b["selected_mean"] == 2
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_lora_through_peft_config(tmp_path, tok):
    from peft import LoraConfig

    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    ref_trainer, ref = stock_run(tmp_path, tok, "stock-lora", peft_config=LoraConfig(**lora))
    _, got = drpost_run(tmp_path, tok, "std-lora", feasible_set="standard", peft_config=LoraConfig(**lora))
    assert_params_close(got, ref)
    t, lw = drpost_run(tmp_path, tok, "lw-lora", frac=0.5, peft_config=LoraConfig(**lora))
    base = params_of(t.model)
    moved = changed(params_of(ref_trainer.model), lw)
    assert moved and all("lora_" in n for n in moved)                          # only adapters train
    assert all(not p.requires_grad for n, p in t.model.named_parameters() if "lora_" not in n)
    assert t.regularizer.groups and all("lora" in g for g in t.regularizer.groups), t.regularizer.groups
    assert base.keys() == ref.keys()


def test_gradient_accumulation_equals_stock(tmp_path, tok):
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ref_trainer, ref = stock_run(tmp_path, tok, "stock-ga", **kw)
    t, got = drpost_run(tmp_path, tok, "std-ga", feasible_set="standard", **kw)
    assert_params_close(got, ref)
    assert [r["loss"] for r in train_logs(t)] == pytest.approx([r["loss"] for r in train_logs(ref_trainer)],
                                                               rel=1e-6)


def test_resume_is_identical(tmp_path, tok):
    kw = dict(frac=0.5, max_steps=4, save_strategy="steps", save_steps=2, refresh_every=2,
              target_strategy="separate")
    _, full = drpost_run(tmp_path, tok, "full", **kw)
    t, _ = drpost_run(tmp_path, tok, "cut", **kw)
    out = tmp_path / "cut"
    shutil.rmtree(out / "checkpoint-4")
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "checkpoint-*"))) == ["checkpoint-2"]
    _, resumed = drpost_run(tmp_path, tok, "cut", resume=True, **kw)
    assert_params_close(resumed, full, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bad input

def _build(tmp_path, tok, target, general=None, **kw):
    from drpost.integrations import DrPostSFTConfig, DrPostSFTTrainer

    kw.setdefault("target_batch_size", 2)
    return DrPostSFTTrainer(model=tiny_model(len(tok)), args=DrPostSFTConfig(**config_kw(tmp_path, "bad", **kw)),
                            processing_class=tok, train_dataset=ds(general or prompt_completion(8, 1)),
                            target_dataset=target)


def test_target_in_no_known_format(tmp_path, tok):
    with pytest.raises(ValueError, match="target example 3 is in none of SFTTrainer's formats"):
        _build(tmp_path, tok, messages(3, 2) + [{"question": "q", "answer": "a"}] + messages(12, 5))
    with pytest.raises(TypeError, match="target_dataset must be a list of dicts or a datasets.Dataset"):
        _build(tmp_path, tok, "target.jsonl")


def test_target_smaller_than_target_batch(tmp_path, tok):
    with pytest.raises(ValueError, match=r"target_batch_size=8 is larger than the target dataset \(4 rows\)"):
        _build(tmp_path, tok, messages(4, 2), target_batch_size=8, n_target=2)
    with pytest.raises(ValueError, match="the target dataset has 4 rows but n_target=16"):
        _build(tmp_path, tok, messages(4, 2))


def test_rows_without_assistant_turn(tmp_path, tok):
    rows = messages(16, 2)
    rows[5] = {"messages": rows[5]["messages"][:1]}
    with pytest.raises(ValueError, match=r"1 target example\(s\) have no assistant turn .*rows 5"):
        _build(tmp_path, tok, rows)
    with pytest.raises(ValueError, match=r"1 general example\(s\) have no assistant turn .*rows 5"):
        _build(tmp_path, tok, messages(16, 3), general=rows[:8])


def test_target_rows_in_mixed_formats(tmp_path, tok):
    with pytest.raises(ValueError, match="target example 4 is in the prompt-completion format but example 0 in the "
                                         "messages format"):
        _build(tmp_path, tok, messages(4, 2) + prompt_completion(12, 3))


def test_target_without_supervised_tokens(tmp_path, tok):
    rows = [{"input_ids": tok(r["prompt"])["input_ids"], "labels": [-100] * len(tok(r["prompt"])["input_ids"])}
            for r in prompt_completion(16, 2)]
    rows[3]["labels"] = list(rows[3]["input_ids"])
    with pytest.raises(ValueError, match=r"15 target example\(s\) have no supervised tokens.*rows 0, 1, 2, 4"):
        _build(tmp_path, tok, rows)


def test_target_rows_truncated_to_nothing_are_named(tmp_path, tok):
    rows = prompt_completion(16, 2)
    rows[7] = {"prompt": "Repeat " + " ".join(WORDS * 4) + ":", "completion": " cat"}
    with pytest.raises(ValueError, match=r"no supervised tokens left after truncation to max_length=32 .*rows 7"):
        _build(tmp_path, tok, rows, max_length=32)
    t = _build(tmp_path, tok, rows, max_length=32, truncation_mode="keep_end")      # the completion survives
    assert len(t.target_dataset) == 16 and len(t.target_dataset[7]["input_ids"]) == 32


def test_target_from_another_tokenizer(tmp_path, tok):
    rows = [{"input_ids": [5, 60000 + i, 7]} for i in range(16)]
    with pytest.raises(ValueError, match="target example 0 has token id 60000, outside this tokenizer's vocabulary"):
        _build(tmp_path, tok, rows)


def test_target_with_another_chat_template(tmp_path, tok):
    """General rows pre-tokenised with a template framing every row with <|endoftext|> ... <jupyter_code>,
    target rows given raw and framed by the processing class's template (<|im_start|>)."""
    begin, mark = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<jupyter_code>")
    general = [{"input_ids": [begin] + tok(r["prompt"] + r["completion"])["input_ids"] + [mark]}
               for r in prompt_completion(8, 1)]
    with pytest.raises(ValueError, match="framed by different special tokens .*different chat templates"):
        _build(tmp_path, tok, messages(16, 2), general=general)


def test_refused_objectives_and_arguments(tmp_path, tok):
    from drpost.integrations import DrPostArguments, DrPostSFTTrainer

    with pytest.raises(ValueError, match="loss_type='nll' only"):
        _build(tmp_path, tok, messages(16, 2), loss_type="dft")
    with pytest.raises(TypeError, match="needs DrPostSFTConfig, got DrPostArguments"):
        DrPostSFTTrainer(model=tiny_model(len(tok)), args=DrPostArguments(output_dir=str(tmp_path / "x")),
                         processing_class=tok, train_dataset=ds(prompt_completion(8, 1)), target_dataset=messages(16, 2))
    from drpost.engine import OptionError
    with pytest.raises(OptionError, match="DrPostSFTConfig: .*frac"):
        _build(tmp_path, tok, messages(16, 2), frac=1.5)
    with pytest.raises(ValueError, match="needs target examples"):
        _build(tmp_path, tok, None)


# ---------------------------------------------------------------------------------------------
# two ranks under torchrun

def run_sft_worker(out_dir: str, per_device: int, **kw) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    tok = tokenizer()
    t, params = drpost_run(Path(out_dir), tok, "dist", frac=0.5, per_device_train_batch_size=per_device,
                           target_batch_size=4, max_length=None, **kw)
    logs = [{k: r[k] for k in ("loss", "selected_mean") if k in r} for r in train_logs(t)]
    return {"params": params, "logs": logs, "world": t.args.world_size, "wrapped": type(t.model_wrapped).__name__,
            "distributed": t.regularizer.distributed}


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from dist_launch import Results, init_worker

    init_worker()
    res = Results()
    res.part("sft", lambda: run_sft_worker(str(out / f"rank{dist.get_rank()}"), per_device=2))
    res.part("sft-free", lambda: run_sft_worker(str(out / f"free{dist.get_rank()}"), per_device=2,
                                                padding_free=True))
    torch.save(res, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from dist_launch import launch

    out = tmp_path_factory.mktemp("sft-dist")
    return launch(__file__, out, timeout=600)


@pytest.mark.parametrize("part,kw", [("sft", {}), ("sft-free", {"padding_free": True})])
def test_two_ranks_equal_one_process(tmp_path, tok, two_ranks, part, kw):
    """Padded rows, and padding-free rows (each rank packs its 2 sequences into one row; the
    ranks' target slices too): the same update as one process on the 4 rows."""
    from dist_launch import part_of

    got = part_of(two_ranks, part)
    ref = run_sft_worker(str(tmp_path / "one"), per_device=4, **kw)
    assert got[0]["world"] == 2 and got[0]["distributed"] and not ref["distributed"]
    assert got[0]["wrapped"] == got[1]["wrapped"] == "LlamaForCausalLM"        # no DDP wrapper
    for name, p in ref["params"].items():
        torch.testing.assert_close(got[0]["params"][name], p, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
        assert torch.equal(got[0]["params"][name], got[1]["params"][name]), name
    assert [r["selected_mean"] for r in got[0]["logs"]] == [r["selected_mean"] for r in ref["logs"]]
    assert [r["loss"] for r in got[0]["logs"]] == pytest.approx([r["loss"] for r in ref["logs"]], rel=1e-6)


if __name__ == "__main__":
    from dist_launch import worker_main

    worker_main(_worker)
