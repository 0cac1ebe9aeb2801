"""Whether bf16 autocast pays on the machine at hand.

bf16 autocast halves the activations' memory, but on a CPU it is only fast where oneDNN has native
bf16 matrix multiplies (AVX512-BF16 or AMX: recent Xeons, AMD Zen 4 and later). On an AVX2-only CPU
(most laptops before 2023, AMD Zen 2/3) every bf16 GEMM falls back to a generic kernel, several
times slower than the fp32 one (a [256, 576] x [576, 49152] lm_head GEMM on a 2-core AVX2 EPYC:
2.9 s in bf16 against 0.46 s in fp32), so a bf16 run there is slower, not faster. The recipes and
the bench say so once per process, with the switch that turns it off."""
from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("drpost.precision")
_WARNED: set = set()
RECIPE_FIX = "Set `train.bf16: false` in the config (or pass --train.bf16 false; the demo: --no-autocast)."


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """True when bf16 matrix multiplies have native kernels on this kind of device."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):   # a build without oneDNN: nothing to tell
            return True
    return True


def default_device_type() -> str:
    """Where the recipes' trainers put the model: CUDA when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def missing_bf16(device_type: str) -> str:
    """What the device lacks, for a message."""
    if device_type == "cpu":
        return (f"this CPU (torch capability {torch.backends.cpu.get_cpu_capability()}) has no native bf16 "
                "matrix multiply (oneDNN needs AVX512-BF16 or AMX)")
    return f"this {device_type} device has no native bf16 support"


def warn_if_slow_bf16(bf16: bool, fix: str = RECIPE_FIX, device_type: str | None = None) -> bool:
    """Log a warning (once per process and device type) when bf16 autocast is asked for where bf16
    GEMMs have no native kernel; ``fix`` says how to turn it off. Returns whether it is slow there."""
    device_type = device_type or default_device_type()
    if not bf16 or native_bf16(device_type):
        return False
    if device_type not in _WARNED:
        _WARNED.add(device_type)
        logger.warning("bf16 autocast is on, but %s: bf16 GEMMs fall back to a generic kernel, several "
                       "times slower than fp32, so the run is slower, not faster. %s", missing_bf16(device_type), fix)
    return True
