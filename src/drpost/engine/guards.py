"""Non-finite guards: NaN/inf never reaches the optimizer (``nonfinite``: 'error' or 'skip').

Losses are checked by the reduction as they are computed, scores and the target gradient by the
per-layer pipeline (a device flag per group, decided at finalize without a host sync in the
backward), and the assembled gradients here, last, before the optimizer sees them.
"""
from __future__ import annotations

import torch


class NonFiniteError(FloatingPointError):
    """A loss, score or target gradient was NaN or infinite."""


def check_grads(att, stats, nonfinite: str, where: str) -> None:
    """Every gradient drpost wrote must be finite (a loss and scores can be finite while an
    accumulation overflows). One fused L2 norm (a single vectorised read of every gradient) and one
    host sync; a norm that overflowed although every entry is finite (|g| > ~1e19 in float32) is
    re-checked entry-wise before anything is refused."""
    params = [p for p in att.trainable if p.grad is not None]
    if not params:
        return
    norms = torch._foreach_norm([p.grad for p in params])
    finite = torch.stack([torch.isfinite(n).to(norms[0].device) for n in norms])
    if bool(finite.all()):
        return
    bad = [i for i in (~finite).nonzero().flatten().tolist() if not bool(torch.isfinite(params[i].grad).all())]
    if not bad:
        return
    name = att.param_name(params[bad[0]])
    for p in att.trainable:
        p.grad = None
    if nonfinite == "error":
        raise NonFiniteError(f"non-finite gradient of {name} {where} (loss and scores were finite: an "
                             "overflow while assembling the update); lower the learning rate or use float32 / "
                             "bf16 instead of float16, or pass nonfinite='skip' to drop such steps")
    stats.skipped = True
