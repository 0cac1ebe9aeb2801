"""``drpost eval``: reload a trained run (its final model / LoRA adapter, or a checkpoint) and evaluate it
again on its test split: :func:`evaluate_run`, :func:`load_trained`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from drpost.config import config_to_dict, load_config
from drpost.data.splits import build_sft_data
from drpost.models import load_model
from drpost.recipes.common import DTYPES, RunDirError, jsonable, last_checkpoint, quiet_peft
from drpost.recipes.sft import evaluate_model

__all__ = ["evaluate_run", "load_trained"]


def _find_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_absolute() and not path.exists():
            path = run_dir / checkpoint
        if not path.is_dir():
            raise RunDirError(f"checkpoint {checkpoint!r} not found (neither a directory nor a folder of {run_dir})")
        return path
    if (run_dir / "final").is_dir():
        return run_dir / "final"
    last = last_checkpoint(run_dir)
    if last is None:
        raise RunDirError(f"{run_dir} has neither a final/ model nor a checkpoint-N folder to evaluate")
    return Path(last)


def load_trained(run_dir: str | Path, checkpoint: str | None = None):
    """``(model, tokenizer, cfg, path)`` of a trained run: the final model/adapter or a checkpoint."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    path = _find_checkpoint(run_dir, checkpoint)
    dtype = DTYPES[cfg.model.dtype]
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tokenizer = load_model(cfg.model.name, num_layers=cfg.model.num_layers, dtype=dtype,
                                     attn_implementation=cfg.model.attn_implementation)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(path))
    else:
        model, tokenizer = load_model(path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    model.eval()
    return model, tokenizer, cfg, path


def evaluate_run(run_dir: str | Path, checkpoint: str | None = None, overrides: list | None = None,
                 progress: bool = True, output: str | Path | None = None) -> dict:
    """Re-evaluate a trained run (``drpost eval``): reload its model (``final/`` by default, or a
    ``checkpoint``), rebuild its test split from its ``config.yaml``, compute perplexity and the
    generation metrics, and write ``eval.json`` (or ``output``). ``overrides`` may change ``eval.*``
    keys only."""
    run_dir = Path(run_dir).expanduser()
    model, tokenizer, cfg, path = load_trained(run_dir, checkpoint)
    if overrides:
        from drpost.config import apply_overrides, config_from_dict, parse_overrides, resolve_key

        pairs = parse_overrides(overrides) if all(isinstance(o, str) for o in overrides) else list(overrides)
        for key, _ in pairs:
            if not resolve_key(key).startswith("eval."):
                raise ValueError(f"drpost eval only accepts eval.* overrides, got {key!r}")
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), pairs))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = build_sft_data(cfg, tokenizer)
    t0 = time.perf_counter()
    result = evaluate_model(model, tokenizer, data, cfg, progress=progress)
    result.update(checkpoint=str(path), run_dir=str(run_dir), seconds=time.perf_counter() - t0,
                  task=data.stats["target_task"])
    out = Path(output) if output else run_dir / "eval.json"
    out.write_text(json.dumps(jsonable(result), indent=1))
    result["path"] = str(out)
    return result
