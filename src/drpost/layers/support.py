"""Where a layer's output gradient is exactly zero: the runs of rows that can be skipped.

A position without a supervised label gets an exactly-zero gradient of the loss w.r.t. the logits,
so the rows of a vocabulary-wide output projection's delta [N, S, Vocab] at the prompt (and padding)
positions are zero, and every product the engine forms from them (the input gradient delta W, the
sketch delta P1, the cross products delta_s . delta_t, the chosen weight gradient delta^T x) gets
nothing from them. A rule may therefore find the **support** of delta once per call, as runs of
consecutive rows of delta flattened to [N * S, O], and compute those products on views of the runs
only (no gathered copy: for a full vocabulary a fresh one costs more than the rows it saves).

Skipping a row whose every entry is zero is exact whatever made it zero; a row holding a NaN or an
inf is never skipped. The search reads one column of delta for every row and the whole row only
where that entry is zero, so it costs a small fraction of one pass over delta.
"""
from __future__ import annotations

import torch

Runs = list[tuple[int, int]]

#: more runs than this and the per-run products cost more in overhead than the rows save
MAX_RUNS = 64


def runs_of_indices(indices) -> Runs:
    """Ascending indices as runs of consecutive ones [(start, stop), ...]."""
    runs: Runs = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def runs_of(mask: list[bool]) -> Runs:
    """The indices where ``mask`` holds, as [(start, stop), ...]."""
    return runs_of_indices(i for i, m in enumerate(mask) if m)


def fill_runs(like: torch.Tensor, shape: tuple, runs: Runs, compute, dtype=None) -> torch.Tensor:
    """A zero tensor of ``shape`` (``like``'s device, ``dtype`` or ``like``'s) with rows [lo, hi)
    of each run set to ``compute(lo, hi)``: a product over the support, zero on the skipped rows."""
    out = like.new_zeros(shape, dtype=dtype or like.dtype)
    for lo, hi in runs:
        out[lo:hi] = compute(lo, hi)
    return out


def nonzero_runs(d2: torch.Tensor) -> Runs | None:
    """The runs of rows of ``d2`` [R, O] that are not all zero, or None when every row may be
    nonzero or skipping is not worth it: no zero row, more than :data:`MAX_RUNS` runs, or a tensor
    off the CPU (reading the answer there would make the host wait for the device)."""
    if d2.device.type != "cpu" or d2.dim() != 2 or d2.shape[0] == 0 or d2.shape[1] == 0:
        return None
    with torch.no_grad():
        candidate = (d2[:, 0] == 0).tolist()       # a nonzero first entry settles the row
        if not any(candidate):
            return None
        zero = [False] * len(candidate)
        spans = runs_of(candidate)
        if len(spans) > MAX_RUNS:                   # scattered candidates: one pass over all rows
            zero = (torch.linalg.vector_norm(d2, 1, dim=1) == 0).tolist()
        else:
            for lo, hi in spans:
                # L1 norm == 0 only for an all-zero row (NaN != 0, so a NaN row is kept)
                part = (torch.linalg.vector_norm(d2[lo:hi], 1, dim=1) == 0).tolist()
                zero[lo:hi] = part
    if not any(zero):
        return None
    runs = runs_of([not z for z in zero])
    return runs if len(runs) <= MAX_RUNS else None


def slice_runs(runs: Runs | None, start: int, stop: int) -> Runs | None:
    """``runs`` restricted to rows [start, stop) and shifted to start at 0 (None stays None)."""
    if runs is None:
        return None
    return [(max(lo, start) - start, min(hi, stop) - start) for lo, hi in runs if hi > start and lo < stop]


def intersect(runs: Runs, support: Runs | None) -> Runs:
    """The rows in both run lists (``support`` None: every row)."""
    if support is None:
        return runs
    out: Runs = []
    for lo, hi in runs:
        for slo, shi in support:
            a, b = max(lo, slo), min(hi, shi)
            if a < b:
                out.append((a, b))
    return out
