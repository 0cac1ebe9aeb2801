"""Gradient all-reduces overlapped with the backward, bucketed as DDP does (distributed only).

:class:`DistributedReduction` hands each group's accumulators to :class:`GradientBuckets` as soon
as they are final (in the finalize call: after the group's assembly; ``global`` scope: right after
the one decision, group by group) and the rest (plain parameters, groups never assembled) at
finalize. A tensor of at least ``alone_bytes`` (1 MiB) is all-reduced by itself, in place, as soon
as it is handed in; smaller ones are packed, in the order they are handed in, into flat buckets of
about ``bucket_bytes``; a full bucket's all-reduce is launched at once (asynchronously) and the
backward goes on. (Packing a large tensor would copy it into a buffer allocated afresh every step:
on the 2-process CPU bench that cost 0.5 s per step, as much as DDP's whole reduction.)
:meth:`GradientBuckets.wait` completes them all and returns every tensor summed over the ranks.
Every rank must hand in tensors of the same shapes in the same order (a parameter with no gradient
on this rank travels as zeros), so every rank issues the same collectives in the same order
whatever it selected.
"""
from __future__ import annotations

import torch

DDP_BUCKET_BYTES = 25 * 2 ** 20     # DistributedDataParallel's default bucket_cap_mb
ALONE_BYTES = 2 ** 20               # a tensor this large is reduced by itself, without a copy


class GradientBuckets:
    def __init__(self, ctx, bucket_bytes: int = DDP_BUCKET_BYTES, on_launch=None, alone_bytes: float = ALONE_BYTES):
        self.ctx, self.bucket_bytes, self.on_launch = ctx, int(bucket_bytes), on_launch
        self.alone_bytes = alone_bytes   # (float("inf"): pack everything)
        self.open: list = []            # (key, tensor) waiting for their bucket to fill
        self.size = 0
        self.flying: list = []          # (pending collective, [(key, shape, numel)] of its flat tensor)
        self.keys: set = set()

    def add(self, key, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (read now, or when its bucket launches: it must not change after this)."""
        if key in self.keys:
            raise RuntimeError(f"drpost: the gradient of {key!r} was handed to the all-reduce twice in one step")
        self.keys.add(key)
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes >= self.alone_bytes:   # by size only: every rank must issue the same collectives
            # in place when contiguous (a rank may hold a transposed view where another holds zeros)
            self._launch([(key, tensor)], tensor if tensor.is_contiguous() else tensor.contiguous())
            return
        if self.open and (tensor.dtype != self.open[0][1].dtype or tensor.device != self.open[0][1].device):
            self.flush()
        self.open.append((key, tensor))
        self.size += nbytes
        if self.size >= self.bucket_bytes:
            self.flush()

    def flush(self) -> None:
        """Launch the open bucket's all-reduce now (asynchronously)."""
        if not self.open:
            return
        items, self.open, self.size = self.open, [], 0
        with torch.no_grad():
            if len(items) == 1 and items[0][1].is_contiguous():
                flat = items[0][1]
            else:
                flat = torch.cat([t.reshape(-1) for _, t in items])
        self._launch(items, flat)

    def _launch(self, items: list, flat: torch.Tensor) -> None:
        self.flying.append((self.ctx.start_all_reduce(flat), [(k, t.shape, t.numel()) for k, t in items]))
        if self.on_launch is not None:
            self.on_launch([k for k, _ in items])

    def wait(self) -> dict:
        """Launch what is left, wait for every bucket; key -> the tensor summed over the ranks."""
        self.flush()
        out = {}
        flying, self.flying = self.flying, []
        for pending, layout in flying:
            flat = pending.wait()
            offset = 0
            for key, shape, n in layout:
                out[key] = flat[offset:offset + n].view(shape)
                offset += n
        return out
