"""The offline-selection baseline in a recipe (``data.offline_share > 0``; ``drpost spectrum`` method ``offline``).

:func:`offline_subset` does what LESS does before training, with the run's own model and regime:

1. **warm-up**: a fresh copy of the base model (LoRA adapters or full fine-tuning, as the run) is
   trained plainly (feasible set ``standard``) for ``data.offline_warmup_steps`` steps on the general
   pool, with the run's optimiser, learning rate and batch size (the schedule spans the warm-up);
2. **scoring**: every general example gets ``cos(g_i, g_T)`` from the warmed-up model
   (:func:`drpost.offline.gradient_cosines`);
3. **subset**: the top ``data.offline_share`` of the pool is kept; the warmed-up model is discarded.

:func:`drpost.recipes.sft.run_sft` then trains the base model on that subset for ``train.steps`` steps
with the run's feasible set (``standard`` for the baseline), so the training budget is that of every
other method; warm-up and scoring are the selection's extra cost, reported in ``metrics.json`` under
``offline`` (seconds, and in units of the run's training steps).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import tempfile
import time
from pathlib import Path

from drpost.config import Config, config_from_dict, config_to_dict
from drpost.data.splits import SFTData
from drpost.offline import describe, gradient_cosines, top_share

__all__ = ["offline_subset", "offline_cost", "OFFLINE_SHARE"]

OFFLINE_SHARE = 0.25   # ``drpost spectrum``'s offline method when the recipe sets no data.offline_share


def warmup_steps(cfg: Config) -> int:
    """``data.offline_warmup_steps``, or 10 % of ``train.steps`` (at least 1) when it is null."""
    w = cfg.data.offline_warmup_steps
    return max(1, round(0.1 * cfg.train.steps)) if w is None else w


def _warmup_config(cfg: Config, steps: int, out: Path) -> Config:
    raw = config_to_dict(cfg)
    raw["drpost"].update(feasible_set="standard", frac=1.0)
    raw["data"].update(offline_share=0.0)
    raw["train"].update(steps=steps, eval_every=0, save_steps=0, save_final=False, log_selections=False,
                        warmup_steps=min(raw["train"]["warmup_steps"], max(0, steps - 1)))
    raw["eval"].update(at_start=False)
    raw["output_dir"], raw["run_name"] = str(out), "warmup"
    return config_from_dict(raw, "offline warm-up")


def offline_subset(cfg: Config, data: SFTData, tokenizer, resume: bool = False, progress: bool = True,
                   world: int = 1) -> tuple[SFTData, dict]:
    """``data`` with its general pool replaced by the offline selection's subset, and what it cost
    (on ``resume``, read back from the run's ``offline.json`` instead of warming up and scoring again)."""
    if world > 1:
        raise ValueError("data.offline_share (offline selection) runs in one process: launch the run without torchrun")
    saved = cfg.run_dir / "offline.json"
    if resume and saved.is_file():
        info = json.loads(saved.read_text())
        return dataclasses.replace(data, general=data.general.select(info["kept_indices"])), info
    return _select(cfg, data, tokenizer, progress)


def offline_cost(info: dict, seconds_per_step: float | None) -> dict:
    """The offline selection's record without its per-row lists, with its cost in training steps."""
    out = {k: v for k, v in info.items() if k not in ("scores", "kept_indices")}
    if seconds_per_step:
        out["cost_in_steps"] = (info["seconds_warmup"] + info["seconds_scoring"]) / seconds_per_step
    return out


def _select(cfg: Config, data: SFTData, tokenizer, progress: bool) -> tuple[SFTData, dict]:
    from transformers import set_seed

    from drpost.models import load_model
    from drpost.recipes.common import DTYPES, prepare_trainable
    from drpost.recipes.sft import autocast_dtype, build_trainer

    share = cfg.data.offline_share
    if not len(data.general):
        raise ValueError("data.offline_share selects from the general pool, and it is empty: set data.n_general > 0")
    steps = warmup_steps(cfg)
    t0 = time.perf_counter()
    set_seed(cfg.train.seed)
    model, _ = load_model(cfg.model.name, num_layers=cfg.model.num_layers, dtype=DTYPES[cfg.model.dtype],
                          attn_implementation=cfg.model.attn_implementation)
    model = prepare_trainable(model, cfg)
    with tempfile.TemporaryDirectory(prefix="drpost-offline-") as tmp:
        wcfg = _warmup_config(cfg, steps, Path(tmp))
        trainer, _ = build_trainer(wcfg, model, tokenizer, data, data.test.select(range(1)), wcfg.run_dir,
                                    resume=False, progress=progress)
        try:
            trainer.train()
        finally:
            if trainer.regularizer is not None:
                trainer.regularizer.detach()
        seconds_warmup = time.perf_counter() - t0
        general_rows = list(data.general)
        scores = gradient_cosines(trainer.model, general_rows, list(data.target), pad_id=tokenizer.pad_token_id,
                                  autocast_dtype=autocast_dtype(cfg), progress=progress)
    del trainer, model
    gc.collect()
    kept = top_share(scores.scores, share)
    info = {"share": share, "warmup_steps": steps, "seconds_warmup": seconds_warmup, **describe(scores, kept, general_rows),
            "scores": [round(float(s), 6) for s in scores.scores], "kept_indices": kept}
    target_kind = data.target[0]["kind"] if len(data.target) else None
    if target_kind is not None:
        flags = [r["kind"] == target_kind for r in general_rows]
        info["target_like_pool"] = sum(flags) / len(flags)
        info["target_like_kept"] = sum(flags[i] for i in kept) / len(kept)
    stats = dict(data.stats, offline_pool=len(general_rows), offline_kept=len(kept))
    return dataclasses.replace(data, general=data.general.select(kept), stats=stats), info
