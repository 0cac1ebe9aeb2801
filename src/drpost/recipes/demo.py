"""`drpost demo`: data-regularized vs standard fine-tuning on a real model with real data, as a recipe.

**Task** (:func:`demo_recipe`, a normal recipe ``data`` section). Target: write the headline of a
BBC *tech* article, from ``n_target`` = 16 target examples; a disjoint held-out test split of
``n_test`` tech articles. General pool: an imperfectly aligned mix in which target-like rows are
rare (``headline_frac`` = 10 % headline examples from the four other BBC sections; the rest, in equal
parts, section classification, ChatterBot Q&A and article continuation) - the setting where the
paper expects selection to matter. No article of the target rows or of the test split is in the pool.

**Runs** (:func:`demo_runs`: one :class:`~drpost.config.Config` per ``--methods`` entry), each
trained by :func:`drpost.recipes.sft.run_sft` (the trainer of ``drpost train``) from the same
starting weights, on the same data and general-batch order, with the same steps, learning rate and
seed:

- ``standard``: the plain general-batch gradient (ordinary fine-tuning);
- ``global``: one top-``frac`` subset of the general batch for all layers, from scores summed
  over layers;
- ``layerwise``: every layer keeps its own top-``frac`` subset (scores = per-layer inner
  products of the per-sample gradients with the target gradient);
- ``random``: every layer keeps ``frac`` of the batch at random - the control that separates
  *what* is selected from sub-sampling itself;
- ``target_only``: train on the 16 target examples alone (the over-fitting reference).

**Budget (<= 15 min on a 2-core CPU, evaluation included).** The defaults were chosen to fit:
full fine-tuning of every Linear weight and norm of the embedded SmolLM2-135M-Instruct (the tied
embedding / lm_head stays frozen: it is 28 M of the 135 M parameters, and the feasibility probe
learnt the task without it), AdamW lr 5e-5 with a constant learning rate and no gradient clipping,
forward and backward under bf16 autocast (master weights and optimizer states in fp32; fp32 throughout
on a CPU without native bf16 GEMMs, where bf16 is several times slower), sequences of
at most 112 tokens (40-word article excerpts, an empty system turn instead of SmolLM's default system
prompt), general batch B = 8 with k = 4 kept (``frac`` 0.5), 2 target rows per step merged into
the same forward/backward, 8 target rows per step for target-only, 40 steps per method. LoRA was
not chosen: in the feasibility probe the backward through the activations dominated a CPU step,
which LoRA does not remove, and LoRA's usual higher learning rate would be another untested knob.
Test perplexity on 50 held-out articles every 10 steps; at the end, greedy headlines (<= 24 new
tokens, first line) for ROUGE-L, for each method and the base model. Measured (2026-11-28, 2-core
CPU, torch 2.13, the demo's own loop then): median seconds per step standard 2.0, global 2.8,
layerwise 2.7, random 2.6, target-only 2.3; one test-perplexity pass ~4 s, one ROUGE-L pass ~4-5 s;
the whole default run took 12 min 57 s with another engineer's job on one of the two cores for ~3
minutes, i.e. about 11 minutes on a quiet machine. ``--steps``, ``--eval-every``, ``--n-test`` and
``--methods`` trade time for detail.

**Reported** (:mod:`drpost.recipes.demo_report`; printed table, ``metrics.json``): test perplexity
before / best / final and the final/best ratio (over-fitting), ROUGE-L, median seconds per step and
its ratio to standard, and the share of headline rows among the (layer, row) pairs the selection
kept against their share in the batches (:class:`SelectionRecorder`). Plots (``plots.py``):
``demo.png`` in the run directory ``<out>/demo-<timestamp>/``, next to ``config.json`` (the resolved
demo settings), ``metrics.json`` (everything in the table plus per-step histories),
``headlines.json``, ``summary.txt`` and one ``drpost train`` run directory per method.

One run is one seed: differences between methods smaller than the seed-to-seed spread (about
1 perplexity point and 0.02 ROUGE-L in the feasibility probe) are not evidence of a win, and the
demo says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from drpost.config import Config, config_from_dict
from drpost.distributed import LaunchRanks
from drpost.engine.options import DrPostOptions, add_arguments, from_arguments, help_meta, option
from drpost.precision import default_device_type, missing_bf16, native_bf16
from drpost.recipes.common import DTYPES, timestamped_dir, write_json
from drpost.recipes.demo_report import format_table, notes

__all__ = ["DemoConfig", "run_demo", "demo_recipe", "demo_runs", "add_demo_arguments", "config_from_args",
           "check_config", "METHODS", "KNOWN_METHODS"]

METHODS = ("standard", "global", "layerwise", "random", "target_only")
KNOWN_METHODS = ("standard", "global", "layerwise", "random", "target_only", "rowwise", "filter", "greedy")
_PLAIN = ("standard", "target_only")
ENGINE_FLAGS = ("frac", "score_norm", "scoring")  # generated from DrPostOptions
_TARGET = {"task": "bbc_headline", "sections": ["tech"]}
_OFF_TASK = ("bbc_category", "chatterbot_qa", "bbc_continuation")  # equal shares of the non-headline rows


@dataclass
class DemoConfig:
    """The demo's settings; the engine knobs (``frac``, ``scoring``, ``score_norm``) are
    :class:`~drpost.engine.options.DrPostOptions` fields re-declared with the demo's defaults; ``seed``
    is the demo's own (it seeds the data and training too, and is passed to the engine)."""

    steps: int = field(default=40, metadata=help_meta("training steps per method"))
    num_layers: Optional[int] = field(default=None, metadata=help_meta(
        "keep only the first N decoder layers of the model (None: all)"))
    methods: tuple = METHODS
    seed: int = field(default=0, metadata=help_meta(
        "seed of the data split and order, of training and of the engine (the 'random' feasible set)"))
    out: str = field(default="runs", metadata=help_meta("parent directory of the run directory"))
    model: str = field(default="smollm2", metadata=help_meta("'smollm2' (embedded) or a local HF model directory"))
    lr: float = field(default=5e-5, metadata=help_meta("AdamW learning rate"))
    batch_size: int = 8  # general rows per step (over all processes)
    target_rows: int = 2  # target rows per step (merged into the selecting methods' backward)
    target_only_batch: int = 8  # rows per step for target_only (all from the target set)
    frac: float = option("frac", 0.5)
    scoring: str = option("scoring", "auto")
    score_norm: str = option("score_norm", "none")
    n_target: int = 16
    n_test: int = field(default=50, metadata=help_meta("held-out tech articles for perplexity and ROUGE-L"))
    n_general: int = field(default=1000, metadata=help_meta("size of the general pool"))
    headline_frac: float = field(default=0.10, metadata=help_meta(
        "share of headline rows (other BBC sections) in the general pool"))
    max_length: int = field(default=112, metadata=help_meta(
        "maximum tokens per sequence; prompts are shortened to fit"))
    eval_every: int = field(default=10, metadata=help_meta("test perplexity every N steps (0: only before/after)"))
    eval_batch_size: int = 25
    max_new_tokens: int = field(default=24, metadata=help_meta("greedy headline length cap for ROUGE-L"))
    rouge: bool = field(default=True, metadata=help_meta("generate headlines and report ROUGE-L"))
    autocast: bool = field(default=True, metadata=help_meta(
        "bf16 autocast for training and evaluation (left off on a CPU without native bf16 GEMMs, "
        "where fp32 is several times faster)"))
    system_prompt: str = ""  # "" = an empty system turn (shorter than SmolLM's default prompt)
    extra: dict = field(default_factory=dict)


_CLI_FIELDS = ("steps", "num_layers", "seed", "out", "model", "lr", "n_test", "n_general", "headline_frac", "max_length",
               "eval_every", "max_new_tokens", "rouge", "autocast")


def check_config(cfg: DemoConfig, world: int = 1) -> None:
    if world > 1 and cfg.batch_size % world:
        raise ValueError(f"the general batch ({cfg.batch_size} rows) must split evenly over the {world} processes: "
                         "choose --nproc dividing it")
    unknown = [m for m in cfg.methods if m not in KNOWN_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(KNOWN_METHODS)}")
    if not cfg.methods:
        raise ValueError("no method given (--methods)")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"a method is listed twice in {list(cfg.methods)}")
    if cfg.steps < 1:
        raise ValueError("steps must be >= 1")
    if cfg.eval_every < 0:
        raise ValueError("eval_every must be >= 0")
    DrPostOptions(**{k: getattr(cfg, k) for k in ENGINE_FLAGS})   # the engine knobs' own checks
    if not 0.0 <= cfg.headline_frac <= 1.0:
        raise ValueError("headline_frac must be in [0, 1]")


def autocast_used(cfg: DemoConfig) -> bool:
    """bf16 autocast where asked and bf16 GEMMs are native here; off on a CPU without them (AVX2
    only), where it would make the demo several times slower (drpost.precision)."""
    return cfg.autocast and native_bf16(default_device_type())


# ---------------------------------------------------------------------------------- the recipe
def demo_recipe(cfg: DemoConfig, method: str = "standard", output_dir: str | Path = "runs", world: int = 1) -> dict:
    """The ``drpost train`` recipe (a config dict) of one demo run: its data, model, drpost and
    training sections. ``train.batch_size`` is per process (``batch_size / world``)."""
    rest = (1.0 - cfg.headline_frac) / len(_OFF_TASK)
    selects = method not in _PLAIN
    return {
        "model": {"name": cfg.model, "num_layers": cfg.num_layers},
        "data": {
            "target": dict(_TARGET), "n_target": cfg.n_target, "test_size": cfg.n_test,
            "general": [{"task": "bbc_headline", "exclude_sections": ["tech"], "weight": cfg.headline_frac}]
            + [{"task": task, "weight": rest} for task in _OFF_TASK],
            "n_general": cfg.n_general, "target_share": 0.0, "max_seq_length": cfg.max_length,
            "overlong": "truncate", "system_prompt": cfg.system_prompt,
        },
        "drpost": {
            "feasible_set": method, "frac": cfg.frac if selects else 1.0, "scoring": cfg.scoring,
            "score_norm": cfg.score_norm if selects else "none", "nonfinite": "error",
            "target_batch_size": cfg.target_only_batch if method == "target_only" else cfg.target_rows,
        },
        "train": {
            "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size // world, "grad_accum": 1,
            "bf16": autocast_used(cfg), "weight_decay": 0.0, "warmup_steps": 0, "lr_scheduler": "constant",
            "max_grad_norm": 0.0, "lora_r": 0, "freeze_embeddings": True, "eval_every": cfg.eval_every,
            "save_steps": 0, "save_final": False, "logging_steps": 1, "seed": cfg.seed,
        },
        "eval": {"metrics": ["rougeL"] if cfg.rouge else [], "n_test": cfg.n_test,
                 "max_new_tokens": cfg.max_new_tokens, "first_line": True, "batch_size": cfg.eval_batch_size,
                 "at_start": False},  # step 0 is the base model, evaluated once for every method
        "output_dir": str(output_dir), "run_name": method,
    }


def demo_runs(cfg: DemoConfig, run_dir: str | Path, world: int = 1) -> list[tuple[str, Config]]:
    """One ``(method, Config)`` per method, each trained into ``<run_dir>/<method>/``."""
    return [(m, config_from_dict(demo_recipe(cfg, m, run_dir, world), origin=f"the demo's {m} run"))
            for m in cfg.methods]


def _base_eval(base_cfg: Config, cfg: DemoConfig, ranks: LaunchRanks):
    """Data (built once for every run) and the base model's test perplexity / headlines."""
    from drpost.data.splits import build_sft_data
    from drpost.models import load_model
    from drpost.recipes.sft import evaluate_model

    model, tok = load_model(cfg.model, num_layers=cfg.num_layers, dtype=DTYPES[base_cfg.model.dtype])
    data = build_sft_data(base_cfg, tok)
    base = None
    if ranks.main:
        res = evaluate_model(model, tok, data, base_cfg, n_test=cfg.n_test)
        base = {"test_ppl": res["test_ppl"]}
        if cfg.rouge:
            base["rougeL"], base["headlines"] = res["rougeL"], res["predictions"]
    return model.config.num_hidden_layers, data, ranks.broadcast(base)


def _result(method: str, run: dict, rec, base: dict) -> dict:
    """One method's row of the demo: its run's metrics merged with the selection record."""
    train = {h["step"]: h for h in run["history"]["train"]}
    history = [{**train.get(r["step"], {}), **r} for r in rec.records]
    for h in history:
        h["skipped"] = bool(h.get("skipped_steps"))
    curve = [{"step": 0, "test_ppl": base["test_ppl"]}] + [{"step": e["step"], "test_ppl": e["ppl"]}
                                                           for e in run["history"]["eval"]]
    best = min(curve, key=lambda c: c["test_ppl"])
    secs = [r["seconds"] for r in rec.records if "seconds" in r]
    result = {
        "selects": method not in _PLAIN, "test_ppl_before": base["test_ppl"], "test_ppl_final": curve[-1]["test_ppl"],
        "test_ppl_best": best["test_ppl"], "best_step": best["step"], "curve": curve,
        "seconds_per_step_median": run["seconds_per_step"], "seconds_total_train": sum(secs),
        "seconds_eval_ppl": rec.eval_seconds, "skipped_steps": sum(h.get("skipped_steps", 0) for h in history),
        "history": history, "run_dir": run["run_dir"],
    }
    result["final_over_best"] = result["test_ppl_final"] / result["test_ppl_best"]
    result.update(rec.summary(history))
    final = run["final"]
    if "rougeL" in final:
        preds = json.loads((Path(run["run_dir"]) / "predictions.json").read_text())
        result.update(rougeL=final["rougeL"], headlines=[p["prediction"] for p in preds],
                      seconds_eval_rouge=final.get("generation_seconds"))
    return result


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; print the comparison table; write and return the metrics."""
    t_start = time.perf_counter()
    from drpost.recipes.selection_record import SelectionRecorder
    from drpost.recipes.sft import run_sft  # the Hugging Face trainer: a few seconds to import

    ranks = LaunchRanks()
    check_config(cfg, ranks.world)
    run_dir = Path(ranks.broadcast(str(timestamped_dir(cfg.out, "demo")) if ranks.main else None))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    if ranks.main:
        (run_dir / "config.json").write_text(json.dumps(
            {**config, "autocast_used": autocast_used(cfg), "torch_threads": torch.get_num_threads(),
             "processes": ranks.world, "command": "drpost demo"},
            indent=2))
    runs = demo_runs(cfg, run_dir, ranks.world)
    n_layers, data, base = _base_eval(runs[0][1], cfg, ranks)
    say = print if ranks.main else (lambda *a, **k: None)
    say(f"drpost demo: {cfg.model} ({n_layers} layers), target = BBC tech headlines "
        f"({len(data.target)} train / {len(data.test)} test), general pool {len(data.general)} "
        f"{data.stats['general_kinds']}, methods {', '.join(cfg.methods)}: {cfg.steps} steps x "
        f"{cfg.batch_size} general rows" + (f" over {ranks.world} processes" if ranks.world > 1 else "")
        + f", lr {cfg.lr:g}, seed {cfg.seed}, run dir {run_dir}", flush=True)
    if cfg.autocast and not autocast_used(cfg):
        say(f"drpost demo: bf16 autocast left off: {missing_bf16(default_device_type())}, so fp32 is "
            "several times faster here", flush=True)
    if ranks.main:
        print(f"base model: test perplexity {base['test_ppl']:.2f}"
              + (f", ROUGE-L {base['rougeL']:.3f}" if cfg.rouge else ""), flush=True)

    results = {}
    for method, run_cfg in runs:
        rec = SelectionRecorder(method, ranks)

        def attach(trainer, rec=rec, method=method):
            rec.attach(trainer)
            _one_bar(trainer, f"train {method}")
        run = run_sft(run_cfg, data=data, on_trainer=attach)
        if ranks.main:
            results[method] = _result(method, run, rec, base)
    if not ranks.main:  # rank 0 evaluates and writes; the others' work ends with the last step
        return {"rank": ranks.rank, "run_dir": str(run_dir)}
    return _report(cfg, config, data, base, results, n_layers, run_dir, ranks, t_start)


def _one_bar(trainer, desc: str) -> None:
    """The demo's console: one progress bar per method with the loss in its postfix, instead of the
    Trainer's printed log dict at every step (the logs still reach metrics.json and TensorBoard)."""
    from transformers.trainer_callback import ProgressCallback

    class _Bar(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(desc)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    if any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_Bar())


def _report(cfg, config, data, base, results, n_layers, run_dir: Path, ranks, t_start) -> dict:
    from drpost.plots import plot_demo

    metrics = {
        "config": config,
        "model_name": "SmolLM2-135M-Instruct" if cfg.model == "smollm2" else cfg.model,
        "model_layers": n_layers,
        "data": {**data.stats, "tokenized": {"target": len(data.target), "test": min(cfg.n_test, len(data.test)),
                                             "general": len(data.general)}},
        "base": {k: v for k, v in base.items() if k != "headlines"},
        "results": {m: {k: v for k, v in r.items() if k != "headlines"} for m, r in results.items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine(),
                        "processes": ranks.world},
    }
    plot_path = plot_demo(metrics, run_dir)
    metrics["plot"] = str(plot_path)
    table, text = format_table(metrics), notes(metrics)
    refs = [ex["references"][0] for ex in data.test_examples[:cfg.n_test]]
    if cfg.rouge:
        (run_dir / "headlines.json").write_text(json.dumps(
            {"reference": refs, "base": base["headlines"], **{m: r["headlines"] for m, r in results.items()}},
            indent=1))
    metrics["seconds_total"] = time.perf_counter() - t_start
    path = write_json(run_dir / "metrics.json", metrics)
    (run_dir / "summary.txt").write_text(table + "\n\n" + text + "\n")

    print(f"\n{table}\n\n{text}")
    if cfg.rouge and refs:
        print("\nfirst test headlines (reference | " + " | ".join(["base", *results]) + "):")
        for i in range(min(3, len(refs))):
            row = [refs[i], base["headlines"][i], *(r["headlines"][i] for r in results.values())]
            print(f"  {i + 1}. " + " | ".join(repr(s) for s in row))
    print(f"\nplot: {plot_path}")
    print(f"metrics: {path}  ({metrics['seconds_total']:.0f} s in total)")
    metrics["path"] = str(path)
    return metrics


# ---------------------------------------------------------------------------------- command line
_EPILOG = """\
defaults and why (budget: <= 15 minutes on a 2-core CPU, evaluation included):
  full fine-tuning of the Linear weights and norms of SmolLM2-135M-Instruct, tied embedding
  frozen; bf16 autocast (fp32 master weights and AdamW states); lr 5e-5; sequences <= 112
  tokens; B = 8 general rows, k = 4 kept per layer (frac 0.5), 2 target rows per step;
  40 steps per method; test perplexity on 50 articles every 10 steps; ROUGE-L of greedy
  headlines at the end. LoRA is not used: the backward through the activations dominates
  a CPU step (feasibility probe) and LoRA does not remove it.
  --methods standard,global,layerwise,target_only drops the random control (~2 min less).
  One run is one seed: small gaps between methods are noise. Every method is a `drpost train`
  run (the same trainer), in <out>/demo-<timestamp>/<method>/.

output: runs/demo-<timestamp>/ with config.json, metrics.json, demo.png (+ ppl.png,
  selection.png, heatmap.png), headlines.json, summary.txt.
"""


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's flags: engine knobs from DrPostOptions, the rest from DemoConfig's fields."""
    d = DemoConfig()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    add_arguments(p, DemoConfig, include=_CLI_FIELDS)
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated feasible sets to compare, from {', '.join(KNOWN_METHODS)} "
                        "(default %(default)s)")
    add_arguments(p, DrPostOptions, include=ENGINE_FLAGS, defaults={k: getattr(d, k) for k in ENGINE_FLAGS})
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes (launches itself under torchrun; each process trains on "
                        "batch_size / nproc general rows per step, same update as one process; default 1)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return from_arguments(args, DemoConfig, methods=methods)
