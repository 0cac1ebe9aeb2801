"""METHOD.md section 9: the bugs of the original code, each checked against drpost (issue 7, part 6).

docs/reliability.md lists all 19 with the test that shows drpost does not have each one (here, or
an existing test elsewhere) or why it does not apply. The tests below are those that did not
already exist."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import models_tiny as mt
from drpost import DataRegularizer

ROOT = Path(__file__).resolve().parents[1]


# --- 1 and 10: MeSO must be the optimizer whatever the feasible set / target strategy says ---------
@pytest.mark.parametrize("feasible_set,strategy", [("target_only", "merged"), ("standard", "separate"),
                                                   ("layerwise", "separate")])
def test_meso_is_used_for_every_feasible_set(tmp_path, feasible_set, strategy):
    """Bug 1 (target-only MeSO silently ran plain AdamW) and bug 10 (MeSO disabled in the separate
    no-selection strategy): the recipe's optimizer depends on train.optimizer only."""
    from drpost.config import load_config
    from drpost.optim import MeSO
    from drpost.recipes import sft

    cfg = load_config(ROOT / "configs" / "tiny_test.yaml",
                      ["--drpost.feasible_set", feasible_set, "--drpost.target_strategy", strategy,
                       "--train.optimizer", "meso", "--train.meso_rank", "4", "--train.lora_r", "0",
                       "--output_dir", str(tmp_path)])
    from datasets import Dataset

    rows = [{k: v[i].tolist() for k, v in mt.make_batch(8, 10, seed=1).items()} | {"kind": "x"} for i in range(8)]
    rows = Dataset.from_list(rows)  # the recipe's splits are datasets.Dataset (drpost.data.splits)
    data = SimpleNamespace(general=rows, target=rows, test=rows)
    model = mt.llama(tied=False).float()
    from transformers import AutoTokenizer

    from drpost.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)  # the recipe's SFTTrainer wants one
    trainer, _ = sft.build_trainer(cfg, model, tok, data, rows, tmp_path / "run",
                                    resume=False, progress=False)
    assert isinstance(trainer.optimizer, MeSO) and trainer.optimizer.sketches()


# --- 3: the MeSO gradient has the scale of the dense gradient (sum / chosen tokens, not a mean) -----
def test_meso_behind_selection_equals_adamw_behind_selection():
    """With identity sketches MeSO *is* AdamW; behind drpost's layerwise selection both must take the
    same steps, so MeSO sees exactly the renormalised chosen gradient (bug 3: a 1/k-too-small mean)."""
    from drpost.optim import MeSO

    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    runs = []
    for use_meso in (False, True):
        model = mt.llama(tied=False, seed=3)
        params = [p for p in model.parameters() if p.requires_grad]
        mats = [p for p in params if p.dim() == 2]
        opt = (MeSO(params, **hp, k1=2, sketches={p: (None, None) for p in mats}) if use_meso
               else torch.optim.AdamW(params, **hp, foreach=False))
        reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5)
        for step in range(3):
            reg.backward(mt.make_batch(6, 10, seed=step), mt.make_batch(2, 10, seed=50 + step))
            opt.step()
            opt.zero_grad()
        reg.detach()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, p in runs[0].items():
        torch.testing.assert_close(runs[1][name], p, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


# --- 6: a zero learning rate does not change the selection --------------------------------------
def test_selection_does_not_depend_on_the_learning_rate(tmp_path):
    """Bug 6: scores were multiplied by the scheduled LR, all 0 on the first warm-up step, so
    filtering kept everything. drpost's scores never see the LR: a warm-up step at LR 0 chooses
    exactly what a step at full LR chooses."""
    from test_trainer import drpost_run

    masks = []
    for name, warmup in (("warm", 3), ("flat", 0)):
        t, _ = drpost_run(tmp_path, name, feasible_set="filter", frac=1.0, max_steps=1, warmup_steps=warmup,
                          lr_scheduler_type="linear")
        lr = t.state.log_history[0]["learning_rate"]
        assert (lr == 0.0) == (warmup > 0)
        masks.append({k: m.clone() for k, m in t.regularizer.last_masks.items()})
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert any(not bool(m.all()) for m in masks[0].values())   # the filter did drop negative samples


# --- 14: documentation and configuration do not drift ---------------------------------------------
def test_readme_documents_every_option_value_and_every_config_key_has_a_comment():
    """Bug 14 (docs/config drift): every feasible set and scoring back-end the code accepts is in the
    README, and every schema field carries its explanation: a help text (the engine's and the RL loop's
    options, drpost/engine/options.py and drpost/training_options.py) or a comment next to it in
    drpost/config.py."""
    import dataclasses

    from drpost import BACKENDS, FEASIBLE_SETS
    from drpost.config import SECTIONS, valid_keys

    readme = (ROOT / "README.md").read_text()
    for name in list(FEASIBLE_SETS) + [b for b in BACKENDS]:
        assert f"`{name}`" in readme, f"README does not document {name!r}"
    source = (ROOT / "src" / "drpost" / "config.py").read_text()
    keys = set(valid_keys())
    undocumented = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f"{section}.{f.name}" not in keys or f.metadata.get("help"):
                continue
            line = re.search(rf"^\s+{f.name}: .*$", source, re.M)
            if line is None or "#" not in line.group(0):
                undocumented.append(f"{section}.{f.name}")
    assert not undocumented, f"config fields without an explanation: {undocumented}"


# --- 15: the embedding's padding row gets no gradient, target side included ------------------------
@pytest.mark.parametrize("feasible_set,strategy", [("target_only", "merged"), ("target_only", "separate"),
                                                   ("layerwise", "merged"), ("layerwise", "separate")])
def test_embedding_padding_row_has_no_gradient_on_either_side(feasible_set, strategy):
    model = mt.tiny_lm(seed=0)
    general = mt.make_batch(6, 10, seed=1)
    target = mt.make_batch(3, 10, seed=2)
    assert bool(((target["input_ids"] == mt.PAD_ID) & (target["attention_mask"] == 1)).any())   # a real pad token
    reg = DataRegularizer(model, feasible_set=feasible_set, target_strategy=strategy, frac=0.5, pad_token_id=mt.PAD_ID)
    reg.backward(general, target)
    grad = model.embed.weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)
    assert bool((grad[mt.PAD_ID] == 0).all()), "the padding row received a gradient"
    reg.detach()


# --- 19: bookkeeping in float32 under bf16 -------------------------------------------------------
def test_scores_and_token_counts_stay_float32_under_bf16_autocast():
    """Bug 19: the score accumulator and token totals were bf16 (integers exact only up to 256)."""
    model = mt.llama(tied=True, num_layers=2, seed=3, kv_heads=1).float()
    general = mt.make_batch(4, 300, seed=5, min_len=290)     # > 256 supervised tokens per row
    target = mt.make_batch(2, 12, seed=6)
    reg = DataRegularizer(model, feasible_set="global", frac=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = reg.backward(general, target)
    assert all(s.dtype == torch.float32 for s in reg.last_scores.values())
    assert reg.last_global_scores.dtype in (torch.float32, torch.float64)
    tokens = float((general["labels"][:, 1:] != -100).sum())
    assert float(torch.tensor(tokens).bfloat16()) != tokens        # the premise: bf16 would round this count
    assert stats.general_tokens.dtype != torch.bfloat16 and float(stats.general_tokens) == tokens
    for tok in stats.selected_tokens.values():
        assert tok.dtype != torch.bfloat16
    reg.detach()
