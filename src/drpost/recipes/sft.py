"""Supervised fine-tuning with Dr. Post-Training, as one readable function: :func:`run_sft`.

    from drpost.config import load_config
    from drpost.recipes import run_sft

    metrics = run_sft(load_config("configs/sft_bbc_headline.yaml", ["--train.steps", "20"]))

The recipe, top to bottom: make the run directory and write the resolved ``config.yaml``; load the
model (the embedded SmolLM2-135M-Instruct or a local directory; LoRA via peft, or full fine-tuning
with a frozen embedding); build the target / test / general splits (:mod:`drpost.data.splits`);
train with :class:`~drpost.integrations.DrPostSFTTrainer` (every ``feasible_set``, ``standard``
included, goes through the same trainer), evaluating the held-out perplexity every
``train.eval_every`` steps; evaluate at the end (perplexity + the task's generation metrics on
``eval.n_test`` test examples); write the outputs.

Run directory ``<output_dir>/<run_name>/``:

- ``config.yaml``: the resolved config;
- ``metrics.json``: final metrics, the step-0 and best perplexity, the per-evaluation history,
  the training-loss history, seconds per step, data statistics; with ``drpost.frac: auto``,
  ``auto_frac``: the schedule's segments (frac, validation losses, reward), eliminations, the
  chosen frac, the frac of every step and their mean (None for a numeric frac);
- ``train_log.jsonl``: the Trainer's log history, one JSON object per line;
- ``predictions.json``: the generated test answers with their references;
- ``tensorboard/``: TensorBoard event files (loss, drpost selection statistics, eval perplexity);
- ``curves.png``: training loss and test perplexity against the step;
- ``checkpoint-N/`` every ``train.save_steps`` steps (``resume=True`` continues from the last one,
  exactly: model, optimizer, scheduler, data order, target sampler, selection RNG);
- ``final/``: the final weights (full fine-tuning) or LoRA adapter, with the tokenizer.

:func:`run_sft` keeps no global state: call it many times in one process (each call loads its own
model; the regularizer's hooks are removed at the end).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from drpost.config import Config, config_to_dict, save_config
from drpost.data.chat import collate
from drpost.data.splits import SFTData, build_sft_data
from drpost.distributed import LaunchRanks
from drpost.evaluation import generate, perplexity
from drpost.evaluation.metrics import generation_scores
from drpost.integrations.trl_sft import DrPostSFTConfig, DrPostSFTTrainer
from drpost.models import load_model
from drpost.plots import plot_curves
from drpost.precision import warn_if_slow_bf16
from drpost.recipes.common import (DTYPES, DiskFullError, RunDirError, check_run_dir,  # noqa: F401 (re-exported)
                                   clear_disk_errors, jsonable, last_checkpoint, make_run_dir, prepare_trainable)
from drpost.recipes.offline import offline_cost, offline_subset

__all__ = ["run_sft", "evaluate_model", "RunDirError", "DiskFullError", "plot_curves"]


def __getattr__(name):  # drpost eval's functions live in drpost.recipes.evaluate (they import this module)
    if name in ("evaluate_run", "load_trained"):
        from drpost.recipes import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# ===================================================================================== recipe
def run_sft(cfg: Config, resume: bool = False, overwrite: bool = False, progress: bool = True, *,
            data: SFTData | None = None, on_trainer: Callable | None = None) -> dict:
    """Train and evaluate one run; returns the metrics written to ``metrics.json``.

    Args:
        cfg: a validated :class:`~drpost.config.Config` (see :func:`drpost.config.load_config`).
        resume: continue from the last ``checkpoint-N`` of the run directory (the model, data and
            drpost settings must be those of the interrupted run; ``train.steps`` may grow).
        overwrite: delete an existing run directory first (otherwise an existing, non-empty run
            directory is an error unless ``resume``).
        progress: progress bars (training, evaluation, generation).
        data: the splits of ``cfg.data`` built already (:func:`~drpost.data.splits.build_sft_data` with this
            model's tokenizer), for a caller that trains several runs on the same data; None builds them.
        on_trainer: called with the trainer before training starts, e.g. to add callbacks
            (``trainer.add_callback``) or observers (``trainer.step_observers``: callables
            ``observer(trainer, target_like, kinds)`` run on every rank after every micro-batch).

    Under ``torchrun`` every rank trains on its shard of each general batch (``train.batch_size`` rows
    per rank) with one global selection (drpost.distributed); rank 0 alone creates the run directory,
    writes TensorBoard logs, generates for the final evaluation and writes the outputs (checkpoints
    are written by the Hugging Face trainer's main process). Other ranks return ``{"rank": r}``.
    """
    t_start = time.perf_counter()
    ranks = LaunchRanks()
    check_run_dir(cfg, resume, overwrite)  # fail fast, before any loading (every rank, before any writes)
    ranks.barrier()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    from transformers import set_seed

    set_seed(cfg.train.seed)

    # ---- model and data (before the run directory is touched: a bad path leaves nothing behind)
    model, tokenizer = load_model(cfg.model.name, num_layers=cfg.model.num_layers, dtype=DTYPES[cfg.model.dtype],
                                  attn_implementation=cfg.model.attn_implementation)
    data = build_sft_data(cfg, tokenizer) if data is None else data
    offline = None
    if cfg.data.offline_share > 0:  # LESS-style: warm up, score the pool, keep its top share (drpost.recipes.offline)
        data, offline = offline_subset(cfg, data, tokenizer, resume=resume, progress=progress, world=ranks.world)
        set_seed(cfg.train.seed)  # the run itself starts from the same RNG state as any other method's
    model = prepare_trainable(model, cfg)
    if cfg.train.fsdp:
        if ranks.world < 2:
            raise ValueError("train.fsdp: true shards the model over several processes: launch with torchrun "
                             "--nproc-per-node N (N >= 2), or set train.fsdp: false")
        from ..fsdp import shard_model

        shard_model(model)
    run_dir = cfg.run_dir
    if ranks.main:
        make_run_dir(cfg, resume, overwrite)
        save_config(cfg, run_dir / "config.yaml")
        if offline is not None:
            (run_dir / "offline.json").write_text(json.dumps(jsonable(offline), indent=1))
    ranks.barrier()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    info = _task_eval_settings(cfg, data)
    say = print if ranks.main else (lambda *a, **k: None)
    say(f"drpost train: {cfg.model.name} ({'LoRA r=%d' % cfg.train.lora_r if cfg.train.lora_r else 'full FT'}, "
          f"{n_trainable / 1e6:.1f}M of {n_total / 1e6:.1f}M parameters trainable), target {data.stats['target_task']} "
          f"({len(data.target)} rows, {len(data.test)} test), general pool {len(data.general)} "
          f"{data.stats['general_kinds']}, feasible_set={cfg.drpost.feasible_set} frac={cfg.drpost.frac}, "
          f"{cfg.train.steps} steps" + (f" on {ranks.world} processes" if ranks.world > 1 else "")
        + f" -> {run_dir}", flush=True)

    # ---- trainer
    test_eval = data.test if info["n_test"] >= len(data.test) else data.test.select(range(info["n_test"]))
    trainer, timer = build_trainer(cfg, model, tokenizer, data, test_eval, run_dir, resume, progress, ranks)
    if on_trainer is not None:
        on_trainer(trainer)
    checkpoint = last_checkpoint(run_dir) if resume else None
    try:
        with clear_disk_errors(run_dir):
            trainer.train(resume_from_checkpoint=checkpoint)
        history = trainer.state.log_history
        if not any(h.get("step") == trainer.state.global_step and "eval_ppl" in h for h in history):
            trainer.evaluate()  # the final perplexity, at the final step
        if cfg.train.save_final:  # every rank calls it; the trainer writes on the main process only
            with clear_disk_errors(run_dir):
                trainer.save_model(str(run_dir / "final"))
        if not ranks.main and not cfg.train.fsdp:
            return {"rank": ranks.rank, "run_dir": str(run_dir)}
        # sharded: every rank runs the same generations (each layer's forward all-gathers its shards;
        # generate() bypasses the root's forward, so the root unit is unsharded around it)
        if cfg.train.fsdp:
            trainer.model.unshard()
        final = evaluate_model(trainer.model, tokenizer, data, cfg, n_test=info["n_test"], progress=progress,
                               perplexity_too=False)
        if cfg.train.fsdp:
            trainer.model.reshard()
        if not ranks.main:
            return {"rank": ranks.rank, "run_dir": str(run_dir)}
        ppl_logs = [h for h in trainer.state.log_history if "eval_ppl" in h]
        final.update(test_loss=ppl_logs[-1]["eval_loss"], test_ppl=ppl_logs[-1]["eval_ppl"],
                     test_tokens=ppl_logs[-1].get("eval_tokens"), step=trainer.state.global_step)
        log_history = list(trainer.state.log_history)
        auto = None if trainer.auto_frac is None else trainer.auto_frac.summary()  # drpost.frac: auto
    finally:
        if trainer.regularizer is not None:
            trainer.regularizer.detach()

    metrics = _metrics(cfg, data, final, log_history, timer, run_dir, n_trainable, n_total, resume, checkpoint)
    metrics["auto_frac"] = auto
    metrics["seconds_total"] = time.perf_counter() - t_start
    if offline is not None:
        metrics["offline"] = offline_cost(offline, metrics["seconds_per_step"])
    _write_outputs(run_dir, metrics, log_history, final)
    print(_summary_line(metrics), flush=True)
    del trainer, model
    gc.collect()
    return metrics


def _task_eval_settings(cfg: Config, data: SFTData) -> dict:
    e, task = cfg.eval, data.task
    return {
        "metrics": list(task.metrics if e.metrics is None else e.metrics),
        "max_new_tokens": e.max_new_tokens or task.max_new_tokens,
        "first_line": task.first_line if e.first_line is None else e.first_line,
        "n_test": len(data.test) if e.n_test is None else min(e.n_test, len(data.test)),
    }


def autocast_dtype(cfg: Config):
    """The recipe's autocast dtype (``train.bf16``: bfloat16, else None = no autocast); warns once
    where bf16 is slower than fp32 (drpost.precision)."""
    warn_if_slow_bf16(cfg.train.bf16)
    return torch.bfloat16 if cfg.train.bf16 else None


class _StepTimer(TrainerCallback):
    """Wall time of every optimisation step (forward, backward, optimizer; not evaluation/saving)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.seconds.append(time.perf_counter() - self._t0)
            self._t0 = None


class _SFTTrainer(DrPostSFTTrainer):
    """``DrPostSFTTrainer`` (on rows the recipe tokenised itself, ``skip_prepare_dataset``) whose ``evaluate`` is the token-mean perplexity of the held-out target test
    split (:func:`drpost.evaluation.perplexity`: the sum of cross-entropies over all supervised tokens
    divided by their number, not a mean of batch means). Logged as ``eval_loss`` / ``eval_ppl``."""

    def __init__(self, *args, eval_batch_size: int = 16, autocast_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._eval_bs, self._eval_autocast = eval_batch_size, autocast_dtype
        # called after every micro-batch as observer(trainer, target_like, kinds): the rows' target-like
        # flags (bool tensor or None) and kinds (list of str or None); the selection is trainer.regularizer's
        self.step_observers: list[Callable] = []

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The drpost step, plus what the selection did with the *target-like* general rows (rows of
        the target task's kind, e.g. headlines of other BBC sections): their share of the batch and
        their share of the (layer, row) pairs the feasible set kept, logged as ``target_like_batch``
        and ``target_like_chosen``."""
        flags = inputs.pop("target_like", None)
        kinds = inputs.pop("kinds", None)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if flags is not None and flags.numel():
            for name, value in _target_like_shares(self.args.feasible_set, flags, self.regularizer).items():
                total, n = self._drpost_metrics.get(name, (0.0, 0))
                self._drpost_metrics[name] = (total + value, n + 1)
        for observe in self.step_observers:
            observe(self, flags, kinds)
        return loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        data = self.eval_dataset if eval_dataset is None else eval_dataset
        t0 = time.time()
        res = perplexity(self.model, list(data), batch_size=self._eval_bs, autocast_dtype=self._eval_autocast,
                         pad_id=getattr(self.processing_class, "pad_token_id", None))
        metrics = {f"{metric_key_prefix}_loss": res["loss"], f"{metric_key_prefix}_ppl": res["ppl"],
                   f"{metric_key_prefix}_tokens": res["tokens"], f"{metric_key_prefix}_runtime": time.time() - t0}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def build_trainer(cfg: Config, model, tokenizer, data: SFTData, test_eval, run_dir: Path, resume: bool,
                  progress: bool, ranks: LaunchRanks | None = None):
    """The recipe's trainer (``DrPostSFTTrainer`` with the held-out perplexity as ``evaluate``) and its step timer.

    The rows are :mod:`drpost.data`'s (chat-formatted, tokenised, labelled, with ``kind``/``source``
    columns), so SFTTrainer's own preparation is skipped and the recipe's collator pads them."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    t, r = cfg.train, cfg.drpost
    eval_steps = t.eval_every if t.eval_every else None
    args = DrPostSFTConfig(
        output_dir=str(run_dir),
        dataset_kwargs={"skip_prepare_dataset": True},   # drpost.data tokenised the rows
        max_length=None,                                 # and enforced data.max_len
        max_steps=t.steps,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing,   # the Trainer enables it on the model
        activation_checkpointing_kwargs={"use_reentrant": t.checkpoint_reentrant} if t.gradient_checkpointing else None,
        bf16=t.bf16,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if ranks is not None and ranks.world > 1 and not torch.cuda.is_available() else None,
        seed=t.seed,
        data_seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        eval_on_start=bool(cfg.eval.at_start and not resume),
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=[],
        disable_tqdm=not progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        **r.trainer_values(),  # the drpost: section (its seed is train.seed, above)
        n_target=cfg.data.n_target,
        selection_log=str(run_dir / "selections.jsonl") if t.log_selections else None,
    )
    optimizers = (_meso(cfg, model), None) if t.optimizer == "meso" else (None, None)
    timer = _StepTimer()
    callbacks = [timer]
    if ranks is None or ranks.main:  # one writer: the ranks' logs are the same
        callbacks.insert(0, TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    trainer = _SFTTrainer(
        model=model, args=args, train_dataset=data.general, eval_dataset=test_eval, target_dataset=data.target,
        data_collator=_collator(tokenizer, data.target[0]["kind"] if len(data.target) else None),
        processing_class=tokenizer,
        callbacks=callbacks, eval_batch_size=cfg.eval.batch_size, autocast_dtype=autocast_dtype(cfg),
        optimizers=optimizers)
    return trainer, timer


def _meso(cfg: Config, model):
    """MeSO over the trainable parameters: every 2-D weight wider than the sketch is compressed."""
    from drpost.optim import MeSO

    t = cfg.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return MeSO(named, lr=t.lr, weight_decay=t.weight_decay, k1=t.meso_rank, refresh_every=t.meso_refresh,
                seed=t.seed)


def _target_like_shares(feasible_set: str, flags: torch.Tensor, reg) -> dict:
    """Share of target-like rows in the general micro-batch and among the (layer, row) pairs kept."""
    flags = flags.detach().to("cpu", torch.bool)
    out = {"target_like_batch": float(flags.float().mean())}
    if feasible_set == "standard":
        out["target_like_chosen"] = out["target_like_batch"]  # every row is used
    elif feasible_set != "target_only" and reg is not None:
        picks = like = 0.0
        for mask in reg.last_masks.values():
            if mask.dim() < 1 or mask.shape[0] != flags.numel():
                continue
            flat = mask.detach().to("cpu").reshape(mask.shape[0], -1).float()  # [B, 1 or output rows]
            picks += float(flat.sum())
            like += float(flat[flags].sum())
        if picks:
            out["target_like_chosen"] = like / picks
    return out


def _collator(tokenizer, target_kind: str | None):
    """Pad a batch; mark the rows of the target task's kind and list the rows' kinds (both popped again
    before the model sees the batch)."""
    def fn(rows):
        batch = collate(rows, pad_id=tokenizer.pad_token_id)
        if all("kind" in r for r in rows):
            batch["kinds"] = [r["kind"] for r in rows]
            if target_kind is not None:
                batch["target_like"] = torch.tensor([r["kind"] == target_kind for r in rows])
        return batch
    return fn


# ===================================================================================== evaluation


def evaluate_model(model, tokenizer, data: SFTData, cfg: Config, n_test: int | None = None, progress: bool = True,
                   perplexity_too: bool = True) -> dict:
    """Test perplexity (token mean) and the task's generation metrics on the first ``n_test`` test
    examples; the returned dict holds ``predictions`` and ``references`` too."""
    info = _task_eval_settings(cfg, data)
    n = info["n_test"] if n_test is None else min(n_test, len(data.test))
    out: dict[str, Any] = {"n_test": n}
    dtype = autocast_dtype(cfg)
    if perplexity_too:
        res = perplexity(model, list(data.test.select(range(n))), batch_size=cfg.eval.batch_size,
                         autocast_dtype=dtype, pad_id=tokenizer.pad_token_id)
        out.update(test_loss=res["loss"], test_ppl=res["ppl"], test_tokens=res["tokens"])
    gen_names = [m for m in info["metrics"] if m not in ("ppl", "perplexity", "loss")]
    if gen_names:
        examples = data.test_examples[:n]
        device = next(model.parameters()).device.type
        ctx = torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()
        t0 = time.perf_counter()
        with ctx:
            preds = generate(model, tokenizer, examples, max_new_tokens=info["max_new_tokens"],
                             batch_size=cfg.eval.batch_size, progress=progress, first_line=info["first_line"],
                             system_prompt=cfg.data.system_prompt)
        refs = [ex["references"] for ex in examples]
        out.update(generation_scores(gen_names, preds, refs))
        out["generation_seconds"] = time.perf_counter() - t0
        out["predictions"], out["references"] = preds, refs
    return out


# ===================================================================================== outputs
def _metrics(cfg: Config, data: SFTData, final: dict, log_history: list, timer: _StepTimer, run_dir: Path,
             n_trainable: int, n_total: int, resume: bool, checkpoint: str | None) -> dict:
    evals = [{"step": h["step"], "loss": h["eval_loss"], "ppl": h["eval_ppl"]} for h in log_history if "eval_ppl" in h]
    keys = ("loss", "general_loss", "target_loss", "selected_mean", "selected_min", "selected_max", "selected_tokens",
            "skipped_steps", "grad_norm", "learning_rate", "target_like_batch", "target_like_chosen", "auto_frac",
            "auto_candidates")
    train = [{"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in log_history if "loss" in h]
    best = min(evals, key=lambda e: e["ppl"]) if evals else None
    start = next((e for e in evals if e["step"] == 0), None)
    secs = timer.seconds

    def run_mean(key):
        vals = [h[key] for h in train if h.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "run_dir": str(run_dir),
        "task": {"target": data.stats["target_task"], **_task_eval_settings(cfg, data)},
        "final": {k: v for k, v in final.items() if k not in ("predictions", "references")},
        "start": start,
        "best": best,
        "final_over_best": final["test_ppl"] / best["ppl"] if best else None,
        "steps": final["step"],
        "seconds_per_step": statistics.median(secs) if secs else None,
        "seconds_per_step_mean": sum(secs) / len(secs) if secs else None,
        "timed_steps": len(secs),
        "resumed_from": checkpoint if resume else None,
        # mean over the logged steps: share of target-like rows in the general batches, and among the
        # (layer, row) pairs the feasible set kept (above the first = the selection prefers them)
        "target_like": {"batch": run_mean("target_like_batch"), "chosen": run_mean("target_like_chosen")},
        "trainable_params": n_trainable,
        "total_params": n_total,
        "history": {"eval": evals, "train": train},
        "data": data.stats,
        "config": config_to_dict(cfg),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }


def _write_outputs(run_dir: Path, metrics: dict, log_history: list, final: dict) -> None:
    with clear_disk_errors(run_dir):
        (run_dir / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1))
        with open(run_dir / "train_log.jsonl", "w") as f:
            for h in log_history:
                f.write(json.dumps(jsonable(h)) + "\n")
        if "predictions" in final:
            (run_dir / "predictions.json").write_text(json.dumps(
                [{"prediction": p, "references": r} for p, r in zip(final["predictions"], final["references"])],
                indent=1))
        plot_curves(metrics, run_dir / "curves.png")


def _summary_line(m: dict) -> str:
    f = m["final"]
    gen = ", ".join(f"{k} {f[k]:.3f}" for k in ("rougeL", "exact_match", "token_f1") if k in f)
    start = f" (step 0: {m['start']['ppl']:.2f})" if m.get("start") else ""
    sps = f", {m['seconds_per_step']:.2f} s/step" if m.get("seconds_per_step") else ""
    return (f"done: step {f['step']}, test perplexity {f['test_ppl']:.2f}{start}"
            + (f", {gen}" if gen else "") + f" on {f['n_test']} test examples{sps}\nrun directory: {m['run_dir']}")
