"""DrPostTrainer (Hugging Face Trainer integration) on tiny float64 Llamas and random-token data.

Reference runs are the stock ``transformers.Trainer`` with the same arguments, seed and data order;
``frac=1`` / ``feasible_set="standard"`` / gradient accumulation must reproduce them, and a run
resumed from a checkpoint must reproduce the uninterrupted one exactly.
"""
import glob
import math
import os
import shutil

import models_tiny as mt
import pytest
import torch
from transformers import Trainer, TrainerCallback

from drpost.integrations import DrPostArguments, DrPostTrainer, TargetSampler

SEQ = 12


def rows(n, seed, seq=SEQ):
    b = mt.make_batch(n, seq, seed)
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def general():
    return rows(32, seed=11)


def target(n=16):
    return rows(n, seed=12)


def make_args(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                learning_rate=1e-2, max_steps=4, logging_steps=1, save_strategy="no", seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return DrPostArguments(**base)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_close(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def train_logs(trainer):
    return [r for r in trainer.state.log_history if "loss" in r]


def mean_loss(model, data):
    """Token-mean loss of the model on a list of rows (eval mode, no grad)."""
    from drpost.batch import row_losses
    batch = {k: torch.stack([r[k] for r in data]) for k in data[0]}
    with torch.no_grad():
        sums, tokens = row_losses(model, batch, None)
    return float(sums.sum() / tokens.sum())


def float64_causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """The stock causal-LM loss (shifted token sum / items of the accumulated step) without HF's
    float32 upcast, so that a float64 model is float64 end to end in the reference run too."""
    logits, labels = outputs.logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss / num_items_in_batch


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory):
    """The stock Trainer, 4 steps of batch 4 (AdamW, linear schedule, clipping at 1.0): parameters and
    logged losses."""
    tmp = tmp_path_factory.mktemp("stock")
    model = mt.llama(tied=False)
    t = Trainer(model=model, args=make_args(tmp), train_dataset=general(), compute_loss_func=float64_causal_lm_loss)
    t.train()
    return params_of(model), [r["loss"] for r in train_logs(t)]


def drpost_run(tmp_path, name="dr", model=None, target_dataset="default", train_dataset=None, callbacks=None,
               resume=None, eval_dataset=None, **kw):
    model = model if model is not None else mt.llama(tied=False)
    t = DrPostTrainer(model=model, args=make_args(tmp_path, name, **kw),
                      train_dataset=train_dataset if train_dataset is not None else general(),
                      target_dataset=target() if target_dataset == "default" else target_dataset,
                      eval_dataset=eval_dataset, callbacks=callbacks)
    t.train(resume_from_checkpoint=resume)
    return t, model


# ---------------------------------------------------------------------------------------------
def test_layerwise_trains_and_logs_selection(tmp_path):
    data = general()
    model = mt.llama(tied=False)
    before = mean_loss(model, data)
    t, _ = drpost_run(tmp_path, model=model, train_dataset=data, frac=0.5, max_steps=6, logging_steps=3,
                      eval_dataset=rows(8, seed=13), eval_strategy="steps", eval_steps=3)
    after = mean_loss(model, data)
    assert after < before - 0.05, (before, after)
    evals = [r["eval_loss"] for r in t.state.log_history if "eval_loss" in r]
    assert len(evals) == 2 and all(math.isfinite(v) for v in evals)   # evaluation runs with the hooks idle
    logs = train_logs(t)
    assert len(logs) == 2
    for r in logs:
        assert r["selected_mean"] == r["selected_min"] == r["selected_max"] == 2   # k = floor(4 * 0.5) per layer
        assert 0 < r["selected_tokens"] <= 4 * SEQ
        assert math.isfinite(r["general_loss"]) and math.isfinite(r["target_loss"])
        assert r["general_loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert r["skipped_steps"] == 0
    reg = t.regularizer
    assert reg is not None and reg.feasible_set == "layerwise"
    assert all(int(m.sum()) == 2 for m in reg.last_masks.values())


@pytest.mark.parametrize("feasible_set,frac", [("layerwise", 1.0), ("standard", 0.5)])
def test_equals_stock_trainer(tmp_path, stock_run, feasible_set, frac):
    ref_params, ref_losses = stock_run
    t, model = drpost_run(tmp_path, feasible_set=feasible_set, frac=frac)
    assert_params_close(params_of(model), ref_params, rtol=1e-9, atol=1e-11)
    # the Trainer keeps its running loss in float32
    assert [r["loss"] for r in train_logs(t)] == pytest.approx(ref_losses, rel=1e-6)


def test_gradient_accumulation_equals_double_batch(tmp_path, stock_run):
    """2 micro-batches of 2 with frac=1 == one batch of 4 (the stock run): the engine normalises by the
    tokens of the whole accumulated step, and the logged loss is the step's token mean."""
    ref_params, ref_losses = stock_run
    t, model = drpost_run(tmp_path, frac=1.0, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert_params_close(params_of(model), ref_params, rtol=1e-9, atol=1e-11)
    logs = train_logs(t)
    assert [r["loss"] for r in logs] == pytest.approx(ref_losses, rel=1e-6)
    assert all(r["selected_mean"] == 4 for r in logs)     # chosen per layer over the accumulated step


def _comparable(records):
    drop = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss")
    return [{k: v for k, v in r.items() if k not in drop} for r in records if "loss" in r]


@pytest.mark.parametrize("feasible_set", ["random", "layerwise"])
def test_resume_from_checkpoint_is_identical(tmp_path, feasible_set):
    kw = dict(feasible_set=feasible_set, frac=0.5, save_strategy="steps", save_steps=2, max_steps=4,
              target_batch_size=3)     # 16 rows, batches of 3: target epochs end mid-run
    full, full_model = drpost_run(tmp_path, "full", **kw)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "drpost_state.pt").is_file()
    resumed, resumed_model = drpost_run(tmp_path, "resumed", resume=str(ckpt), **kw)

    assert_params_close(params_of(resumed_model), params_of(full_model), rtol=0, atol=0)
    full_masks, res_masks = full.regularizer.last_masks, resumed.regularizer.last_masks
    assert full_masks.keys() == res_masks.keys()
    for k in full_masks:
        assert torch.equal(full_masks[k], res_masks[k]), k
    # the resumed history starts with the checkpoint's records of steps 1-2; steps 3-4 are new
    assert len(_comparable(resumed.state.log_history)) == 4
    assert _comparable(resumed.state.log_history)[2:] == _comparable(full.state.log_history)[2:]
    assert resumed._sampler.state_dict() == full._sampler.state_dict()

    if feasible_set == "random":
        # without the saved generator state the resumed selections differ: the state is what matters
        bare = tmp_path / "bare-ckpt"
        shutil.copytree(ckpt, bare)
        os.remove(bare / "drpost_state.pt")
        os.remove(bare / "drpost_manifest.json")   # a foreign checkpoint: no manifest either (else: corrupted)
        with pytest.warns(UserWarning, match="drpost_state.pt"):
            bare_t, _ = drpost_run(tmp_path, "bare", resume=str(bare), **kw)
        assert any(not torch.equal(full_masks[k], bare_t.regularizer.last_masks[k]) for k in full_masks)


@pytest.mark.parametrize("kw", [
    dict(feasible_set="target_only"),
    dict(feasible_set="global", score_norm="cosine"),
    dict(feasible_set="filter", scope="global"),
    dict(feasible_set="rowwise", scoring="direct"),
    dict(feasible_set="greedy", greedy_lr=1e-2),
    dict(target_strategy="separate", refresh_every=2, scoring="sketch", sketch="countsketch-8x8"),
], ids=lambda kw: "-".join(map(str, kw.values())))
def test_other_configurations_run(tmp_path, kw):
    t, _ = drpost_run(tmp_path, max_steps=2, **kw)
    logs = train_logs(t)
    assert len(logs) == 2
    for r in logs:
        assert math.isfinite(r["loss"]) and math.isfinite(r["target_loss"]) and r["skipped_steps"] == 0
        assert ("selected_mean" in r) == (kw.get("feasible_set") != "target_only")


def test_resume_between_target_refreshes_is_identical(tmp_path):
    """separate strategy, target refreshed every 3 steps, checkpoint at step 2: the cached target
    gradient travels in the checkpoint, so the resumed step 3 uses it exactly as the full run does."""
    kw = dict(target_strategy="separate", refresh_every=3, save_strategy="steps", save_steps=2, max_steps=4)
    full, full_model = drpost_run(tmp_path, "full", **kw)
    resumed, resumed_model = drpost_run(tmp_path, "resumed", resume=str(tmp_path / "full" / "checkpoint-2"), **kw)
    assert_params_close(params_of(resumed_model), params_of(full_model), rtol=0, atol=0)
    for k, m in full.regularizer.last_masks.items():
        assert torch.equal(m, resumed.regularizer.last_masks[k]), k


def test_lora_trains_only_adapters(tmp_path):
    import datasets   # a dependency of drpost: missing is an error, not a skip
    to_ds = lambda rs: datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rs])  # noqa: E731
    model = mt.lora(mt.llama(tied=False), ["q_proj", "v_proj"])
    before = params_of(model)
    t, _ = drpost_run(tmp_path, model=model, train_dataset=to_ds(general()), target_dataset=to_ds(target()),
                      max_steps=3)
    after = params_of(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == changed
    assert all("lora_" in name for name in t.regularizer.groups)
    assert all(r["selected_mean"] == 2 for r in train_logs(t))


def test_bf16_autocast_on_cpu_with_accumulation(tmp_path):
    model = mt.llama(tied=False).float()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = params_of(model)
    t, _ = drpost_run(tmp_path, model=model, bf16=True, max_steps=2, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2)
    assert t.accelerator.mixed_precision == "bf16"
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(math.isfinite(r["loss"]) and r["selected_mean"] == 2 for r in train_logs(t))
    assert any(not torch.equal(before[n], p) for n, p in params_of(model).items())


class _Poison(TrainerCallback):
    """NaN embeddings during optimisation step ``bad`` (0-based); records grads and weights."""

    def __init__(self, model, bad):
        self.bad, self.on, self.snapshots, self.grads_none = bad, False, [], None
        model.get_input_embeddings().register_forward_hook(
            lambda m, i, o: o * float("nan") if self.on else None)

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.on = state.global_step == self.bad

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.on:
            self.grads_none = all(p.grad is None for p in model.parameters())

    def on_step_end(self, args, state, control, model=None, **kw):
        self.on = False
        self.snapshots.append(params_of(model))


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    model = mt.llama(tied=False)
    poison = _Poison(model, bad=1)
    t, _ = drpost_run(tmp_path, model=model, callbacks=[poison], max_steps=3, logging_steps=3, nonfinite="skip")
    assert poison.grads_none is True
    assert_params_close(poison.snapshots[1], poison.snapshots[0], rtol=0, atol=0)   # the optimizer did nothing
    assert any(not torch.equal(poison.snapshots[2][n], poison.snapshots[1][n]) for n in poison.snapshots[1])
    steps = {int(s["step"]) for s in t.optimizer.state.values()}
    assert steps == {2}                                   # AdamW counted only the two real steps
    (log,) = train_logs(t)
    assert log["skipped_steps"] == 1 and math.isfinite(log["general_loss"])


def test_tensorboard_receives_drpost_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t, _ = drpost_run(tmp_path, max_steps=2, report_to=["tensorboard"])
    (events,) = glob.glob(str(tmp_path / "dr" / "**" / "events.out.tfevents*"), recursive=True)
    acc = EventAccumulator(events)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("loss", "general_loss", "target_loss", "selected_mean", "selected_min", "selected_max",
                 "selected_tokens", "skipped_steps"):
        assert f"train/{name}" in tags, (name, sorted(tags))


# ---------------------------------------------------------------------------------------------
# bad input

def test_target_smaller_than_n_target(tmp_path):
    with pytest.raises(ValueError, match="n_target=16"):
        DrPostTrainer(model=mt.llama(tied=False), args=make_args(tmp_path), train_dataset=general(),
                      target_dataset=target(8))


def test_target_rows_without_supervised_tokens(tmp_path):
    bad = target()
    bad[3]["labels"] = torch.full_like(bad[3]["labels"], -100)
    bad[5]["labels"] = bad[5]["labels"].clone()
    bad[5]["labels"][1:] = -100                    # only position 0, which no token predicts
    with pytest.raises(ValueError, match=r"2 target example\(s\) have no supervised tokens.*rows 3, 5"):
        DrPostTrainer(model=mt.llama(tied=False), args=make_args(tmp_path), train_dataset=general(),
                      target_dataset=bad)


def test_target_batch_larger_than_target_dataset(tmp_path):
    with pytest.raises(ValueError, match="target_batch_size=20 is larger than the target dataset"):
        DrPostTrainer(model=mt.llama(tied=False), args=make_args(tmp_path, target_batch_size=20),
                      train_dataset=general(), target_dataset=target())


def test_missing_target_and_wrong_args(tmp_path):
    with pytest.raises(ValueError, match="needs target examples"):
        DrPostTrainer(model=mt.llama(tied=False), args=make_args(tmp_path), train_dataset=general())
    from transformers import TrainingArguments
    with pytest.raises(TypeError, match="DrPostArguments"):
        DrPostTrainer(model=mt.llama(tied=False), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                      train_dataset=general(), target_dataset=target())


@pytest.mark.parametrize("kw,match", [
    (dict(feasible_set="topk"), "unknown feasible_set 'topk'"),
    (dict(scoring="ghost"), "unknown scoring"),
    (dict(frac=0.0), r"frac .* must be a number in \(0, 1\]"),
    (dict(frac=1.5), r"\(0, 1\]"),
    (dict(target_batch_size=0), "target_batch_size must be a positive integer"),
    (dict(sketch="gaussian"), "bad sketch spec"),
    (dict(nonfinite="ignore"), "unknown nonfinite"),
])
def test_bad_arguments_fail_at_construction(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **kw)


def test_target_sampler_is_seeded_and_endless():
    a, b = TargetSampler(10, 3, seed=5), TargetSampler(10, 3, seed=5)
    seq = [a.next_indices() for _ in range(9)]
    assert seq == [b.next_indices() for _ in range(9)]
    for epoch in range(3):                       # 3 batches per epoch, no row twice within an epoch
        flat = sum(seq[3 * epoch:3 * epoch + 3], [])
        assert len(set(flat)) == 9
    assert seq[0:3] != seq[3:6]                 # reshuffled per epoch
    c = TargetSampler(10, 3, seed=5)
    for _ in range(4):
        c.next_indices()
    d = TargetSampler(10, 3, seed=0)
    d.load_state_dict(c.state_dict())
    assert [d.next_indices() for _ in range(5)] == seq[4:9]
    with pytest.raises(ValueError, match="same target dataset"):
        TargetSampler(11, 3, seed=5).load_state_dict(c.state_dict())


def test_hf_argument_parser_sees_every_drpost_option(tmp_path):
    """DrPostArguments inherits DrPostOptions: every engine knob is a flag with the same help and choices,
    the regularizer is built from exactly those values, and seed is TrainingArguments' seed."""
    import dataclasses

    from transformers import HfArgumentParser

    from drpost import DrPostOptions

    parser = HfArgumentParser(DrPostArguments)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(DrPostOptions):
        assert f.name in actions, f.name
        if f.name != "seed":   # TrainingArguments' own seed (it seeds drpost too)
            assert actions[f.name].help == f.metadata["help"], f.name
            assert list(actions[f.name].choices or []) == list(f.metadata.get("choices", [])), f.name
    assert "target_batch_size" in actions and "n_target" in actions and "selection_log" in actions
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--feasible_set", "filter", "--frac", "0.25",
         "--score_norm", "cosine", "--seed", "3", "--target_batch_size", "4"])
    assert args.nonfinite == "skip" and args.target_batch_size == 4
    assert args.engine_options() == DrPostOptions(feasible_set="filter", frac=0.25, score_norm="cosine", seed=3,
                                                  nonfinite="skip")
    with pytest.raises(ValueError, match=r"DrPostArguments: frac .* must be a number in \(0, 1\]"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--frac", "1.5"])
