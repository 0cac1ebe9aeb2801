"""What the recipes share (``sft``, ``rl``, ``spectrum``, ``demo``): run directories, resume checks,
trainable-parameter setup, the dtype table, JSON conversion and disk-full handling.

Recipes import from here and never from each other's private names.
"""

from __future__ import annotations

import errno
import math
import shutil
import sys
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch

from drpost.config import Config, config_to_dict, load_config
from drpost.models import enable_activation_checkpointing

__all__ = ["RunDirError", "DiskFullError", "DTYPES", "RESUME_FIXED", "RESUME_FIXED_TRAIN", "check_run_dir",
           "make_run_dir", "timestamped_dir", "check_resume_compatible", "last_checkpoint", "prepare_trainable",
           "enable_checkpointing",
           "quiet_peft", "jsonable", "write_json", "clear_disk_errors"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Sections (and train keys) that must not change when a run is resumed: they decide the data, the
# model's trainable parameters and the optimizer state a checkpoint holds.
RESUME_FIXED = ("model", "data", "drpost")
RESUME_FIXED_TRAIN = ("seed", "batch_size", "grad_accum", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                      "freeze_embeddings")


class RunDirError(RuntimeError):
    """The run directory is in a state the request does not fit (exists, nothing to resume...)."""


class DiskFullError(RuntimeError):
    """Saving a checkpoint, the final model or the outputs ran out of disk space."""


# ===================================================================================== run directories
def check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory the request does not fit (before anything is loaded or written)."""
    run_dir = cfg.run_dir
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other")
    if resume:
        if last_checkpoint(run_dir) is None:
            raise RunDirError(f"nothing to resume in {run_dir}: it has no complete checkpoint-N folder (set "
                              "train.save_steps > 0 to write checkpoints)")
        saved = run_dir / "config.yaml"
        if saved.is_file():
            check_resume_compatible(load_config(saved), cfg, run_dir)
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
        raise RunDirError(f"run directory {run_dir} already exists and is not empty: pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --run_name / --output_dir")


def make_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Create the run directory (deleting it first with ``overwrite``)."""
    run_dir = cfg.run_dir
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def timestamped_dir(parent: str | Path, prefix: str) -> Path:
    """Create and return a fresh ``<parent>/<prefix>-<YYYYmmdd-HHMMSS>[-n]`` directory."""
    base = Path(parent) / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def check_resume_compatible(saved: Config, cfg: Config, run_dir: Path) -> None:
    """A resumed run must keep the settings that decide its data, parameters and optimizer state."""
    a, b = config_to_dict(saved), config_to_dict(cfg)
    diffs = []
    for section in RESUME_FIXED:
        diffs += [f"{section}.{k}" for k in b[section] if a[section].get(k) != b[section][k]]
    diffs += [f"train.{k}" for k in RESUME_FIXED_TRAIN if a["train"].get(k) != b["train"][k]]
    if diffs:
        raise RunDirError(f"cannot resume {run_dir} with different settings: {', '.join(diffs)} changed since the "
                          "run started (only train.steps, evaluation and saving settings may change on resume)")


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint (its manifest verifies); broken newer ones are reported and skipped."""
    from drpost.checkpoint import last_valid_checkpoint

    found = last_valid_checkpoint(run_dir, report=lambda msg: print(msg, file=sys.stderr, flush=True))
    return str(found) if found is not None else None


# ===================================================================================== trainable parameters
def prepare_trainable(model, cfg: Config):
    """Freeze the embedding and/or wrap the model with LoRA adapters (``cfg.train``)."""
    t = cfg.train
    if t.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)  # a tied lm_head shares this weight
    if t.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules=list(t.lora_targets), task_type="CAUSAL_LM")
        try:
            with quiet_peft():
                model = get_peft_model(model, lora)
        except ValueError as err:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"train.lora_targets {t.lora_targets} do not match the model's Linear layers "
                             f"({', '.join(names)}): {err}") from None
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter (check train.freeze_embeddings / train.lora_targets)")
    return model


def enable_checkpointing(model, cfg: Config) -> None:
    """``train.gradient_checkpointing``: Hugging Face activation checkpointing of every decoder layer
    (for a recipe that runs its own loop; the SFT recipe passes it to the Trainer's arguments)."""
    t = cfg.train
    if t.gradient_checkpointing:
        with quiet_peft():
            enable_activation_checkpointing(model, t.checkpoint_reentrant)


@contextmanager
def quiet_peft():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning per call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ===================================================================================== outputs
def jsonable(obj):
    """``obj`` with non-finite floats as None, tensors as lists, paths as strings, keys as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj, indent: int = 1) -> Path:
    """Write ``jsonable(obj)`` to ``path``."""
    import json

    Path(path).write_text(json.dumps(jsonable(obj), indent=indent))
    return Path(path)


class clear_disk_errors:
    """Turn "no space left on device" (an OSError, or torch's writer RuntimeError) into a clear
    :class:`DiskFullError`; any other error passes unchanged."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None:
            return False
        text = str(err)
        full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or any(
            s in text for s in ("No space left", "file write failed", "unexpected pos"))
        if not full:
            return False
        try:
            free = f"{shutil.disk_usage(self.run_dir).free / 2 ** 30:.2f} GiB free now"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(
            f"ran out of disk space while saving under {self.run_dir} ({free}): free some space, keep fewer "
            "checkpoints (train.save_total_limit), save less often (train.save_steps) or not at all "
            "(train.save_steps 0, train.save_final false), or train LoRA adapters (train.lora_r) whose checkpoints "
            "are small. A complete earlier checkpoint can be continued with --resume.") from err
