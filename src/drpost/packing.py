"""Packed (padding-free) batches: which tokens make up each *sample*.

A padding-free batch (TRL's ``DataCollatorForLanguageModeling(padding_free=True)``) holds several
sequences in one row, with ``position_ids`` restarting at every sequence start and no
``attention_mask``; flash-attention kwargs ``cu_seq_lens_q`` (cumulative lengths over the
flattened [N*T] tokens) may come with it. In drpost a sample is one *sequence*, not one row:
scores, selection and token counts are per sequence (METHOD §1.6 token sums, per sequence).

:class:`Layout` is the map row/position -> sample. One sample per row (an ordinary padded batch)
is the identity layout and costs nothing: :meth:`Layout.samples` returns its input. Otherwise it
gathers a per-token tensor [N, T, ...] into [S, Tmax, ...], zero-padded (a zero factor adds
nothing to a per-sample gradient).
"""
from __future__ import annotations

import torch

FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class Layout:
    def __init__(self, rows: int, length: int, starts: list[list[int]] | None):
        """``starts[r]``: the start positions of the samples of row r (first is 0); None = identity."""
        self.rows, self.length = rows, length
        self.identity = starts is None or all(s == [0] for s in starts)
        if self.identity:
            self.n = rows
            return
        spans = [(r, a, b) for r, st in enumerate(starts) for a, b in zip(st, st[1:] + [length])]
        self.n = len(spans)
        self.first_sample = [0]                       # first sample of each row (cumulative)
        for st in starts:
            self.first_sample.append(self.first_sample[-1] + len(st))
        tmax = max(b - a for _, a, b in spans)
        idx = torch.zeros(self.n, tmax, dtype=torch.long)
        valid = torch.zeros(self.n, tmax, dtype=torch.bool)
        sample_of = torch.empty(rows * length, dtype=torch.long)
        for s, (r, a, b) in enumerate(spans):
            idx[s, :b - a] = torch.arange(r * length + a, r * length + b)
            valid[s, :b - a] = True
            sample_of[r * length + a:r * length + b] = s
        self.index, self.valid, self.sample_of = idx, valid, sample_of.view(rows, length)
        self.starts = starts

    def to(self, device) -> "Layout":
        if not self.identity:
            self.index, self.valid = self.index.to(device), self.valid.to(device)
            self.sample_of = self.sample_of.to(device)
        return self

    # ------------------------------------------------------------------ per-token -> per-sample
    def samples(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, ...] -> [S, Tmax, ...], zero where a sample is shorter than Tmax."""
        if self.identity:
            return x
        flat = x.reshape(self.rows * self.length, *x.shape[2:])
        out = flat[self.index]
        mask = self.valid.view(*self.valid.shape, *([1] * (x.dim() - 2)))
        return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values [N, T] summed per sample -> [S]."""
        if self.identity:
            return values.sum(1)
        out = torch.zeros(self.n, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.sample_of.reshape(-1), values.reshape(-1))

    def starts_mask(self) -> torch.Tensor | None:
        """[N, T] bool, True at the first token of every sample after a row's first (None: identity)."""
        if self.identity:
            return None
        m = torch.zeros(self.rows, self.length, dtype=torch.bool)
        for r, st in enumerate(self.starts):
            m[r, st[1:]] = True
        return m.to(self.sample_of.device)

    def rows_of(self, n_samples: int) -> int:
        """The number of whole rows holding the first ``n_samples`` samples (rows never mix the
        general and the target samples of a merged batch)."""
        if self.identity:
            return n_samples
        r = self.first_sample.index(n_samples) if n_samples in self.first_sample else None
        if r is None:
            raise AssertionError("a row mixes general and target samples")
        return r

    def cu_seq_lens(self, device) -> tuple[torch.Tensor, int]:
        """Flash-attention ``cu_seq_lens`` over the flattened tokens and the longest sample."""
        starts = [r * self.length + a for r, st in enumerate(self.starts or [[0]] * self.rows) for a in st]
        cu = torch.tensor(starts + [self.rows * self.length], dtype=torch.int32, device=device)
        return cu, int(cu.diff().max())


def packed(batch: dict) -> bool:
    return any(k in batch for k in ("position_ids", "cu_seq_lens_q"))


def _merge_unsupervised_tails(starts: list[list[int]], labels, length: int) -> list[list[int]]:
    """Fold each row's trailing segments without a supervised token into the sample before them.

    They are the padding of a packed row (pad tokens whose position_ids restart at every token, or
    one pad run): they carry no loss and, the attention being causal, no supervised token depends on
    them, so their tokens add exactly zero to the sample they join, while counting them as samples
    would change B (and so k = floor(B * frac)) and the per-sample statistics."""
    if labels is None or not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return starts
    supervised = (labels != -100).cpu()
    out = []
    for r, st in enumerate(starts):
        st = list(st)
        while len(st) > 1 and not bool(supervised[min(r, supervised.shape[0] - 1), st[-1] + 1:length].any()):
            st.pop()   # a segment's first label is never trained on (no token before it in the sequence)
        out.append(st)
    return out


def layout_of(batch: dict) -> Layout:
    """The sample layout of a batch: from ``cu_seq_lens_q`` when present, else from restarts of
    ``position_ids`` (t is a start when position_ids[t] != position_ids[t-1] + 1), else identity.
    A row's trailing segments without a supervised label (its padding) belong to the sample before
    them (:func:`_merge_unsupervised_tails`)."""
    ids = batch["input_ids"]
    n, t = ids.shape
    cu = batch.get("cu_seq_lens_q")
    pos = batch.get("position_ids")
    if cu is not None:
        flat = [int(v) for v in torch.as_tensor(cu).tolist()]
        if flat[0] != 0 or flat[-1] != n * t or any(b <= a for a, b in zip(flat, flat[1:])):
            raise ValueError(f"cu_seq_lens_q must rise strictly from 0 to {n * t} (the batch's tokens), got {flat}")
        starts = [[0] for _ in range(n)]
        for s in flat[1:-1]:
            r, a = divmod(s, t)
            if a:
                starts[r].append(a)
        return Layout(n, t, _merge_unsupervised_tails(starts, batch.get("labels"), t)).to(ids.device)
    if pos is None:
        return Layout(n, t, None)
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] != t or pos.shape[0] not in (1, n):
        raise ValueError(f"position_ids must be a [batch, seq] tensor like input_ids {tuple(ids.shape)}, "
                         f"got {getattr(pos, 'shape', type(pos).__name__)}")
    pos = pos.expand(n, t)
    restart = torch.zeros_like(pos, dtype=torch.bool)
    restart[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(restart.any()):
        return Layout(n, t, None)
    starts = [[0] + row.nonzero().flatten().tolist() for row in restart.cpu()]
    layout = Layout(n, t, _merge_unsupervised_tails(starts, batch.get("labels"), t))
    return layout if layout.identity else layout.to(ids.device)
