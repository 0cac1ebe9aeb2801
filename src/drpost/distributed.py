"""Data-parallel drpost: several processes (``torchrun``), one global, symmetric selection.

Each rank holds a different shard of the general batch (the same number of rows B on every rank)
and, optionally, a different slice of the target batch. A distributed step gives the same update
as one process running on the concatenated batches:

* **Target.** At the start of a step the target slices are all-gathered (padded to a common length
  with the pad id / attention 0 / labels -100), so every rank forwards the *whole* target batch
  (merged strategy) or captures it (separate strategy). Every rank then holds the identical target
  representation and target token count, and the per-layer scoring needs no collective of its own.
  The price is V_total target rows of forward/backward on every rank instead of V_total / R; the
  target batch is small (a few rows) next to the general batch, and the alternative (an all-reduce
  of every layer's target representation inside the backward) would put one collective per layer
  on the critical path and could not serve the pairwise-ghost back-end, whose target side is the
  factors themselves.
* **Selection.** Per scored group (or once, for ``global`` scope) the normalised local scores are
  all-gathered in rank order and the feasible set is applied to the concatenation exactly as one
  process would (same k = num_selected(R*B, frac), same tie-breaking); each rank keeps its slice of
  the mask. ``random`` draws the global mask from the generator every rank holds in the same state.
  The gather is launched asynchronously (:func:`start_gather_scores`; on CPU on a side gloo group)
  and the choice finished a few groups later (``DistributedReduction.decision_window``).
* **Update.** In the call that finalizes the step, each group's raw chosen gradient is all-reduced
  asynchronously as soon as it is final (after its assembly; bucketed as DDP does, zeros where this
  rank chose nothing: :mod:`drpost.engine.overlap`), overlapped with the rest of the backward. At
  ``finalize`` one small all-reduce sums the chosen-token counts of every group, the token count
  of the plain (unscored) parameters, the non-finite flags and which parameters have a gradient;
  the plain parameters' all-reduce is launched, every reduction is waited for, and every rank
  divides by the *global* counts, so all ranks write the identical ``.grad``. drpost does this itself: the
  model must not be wrapped in ``DistributedDataParallel``.

Every rank runs the same collectives in the same order whatever it selected, so a rank that keeps
no sample still takes part. Errors are raised on every rank when they are decided from gathered
data (mismatched configuration, unequal batch sizes, non-finite steps, no supervised tokens).
"""
from __future__ import annotations

import datetime
import hashlib
import os

import torch
import torch.distributed as dist

from .batch import IGNORE_INDEX

BUCKET_BYTES = 64 * 2 ** 20      # all_reduce_tensors: flat buckets of at most this size
# torch >= 2.12 names the one-tensor all-gather all_gather_single (all_gather_into_tensor is deprecated)
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


TIMEOUT_ENV = "DRPOST_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0


class DistributedFaultError(RuntimeError):
    """A collective failed or timed out: another rank crashed, was killed or hangs."""


def collective_timeout() -> float:
    """Seconds a drpost collective may wait for the other ranks (``DRPOST_COLLECTIVE_TIMEOUT``)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


_SIDE_GROUPS: dict = {}     # id(default group) -> (that group, its side group for score gathers)


class DistContext:
    """The process group drpost's collectives run on, and this process's place in it.

    On CPU (gloo) every collective is waited for with a deadline (:func:`collective_timeout`): a
    rank that crashed makes the others fail at once (the connection drops), a rank that hangs makes
    them fail after the deadline, both with :class:`DistributedFaultError` naming the collective,
    instead of blocking the job forever. On CUDA (NCCL) a host-side wait would synchronise every
    collective, so the process group's own ``timeout`` (``init_process_group(timeout=...)``, NCCL's
    watchdog) is the bound there."""

    def __init__(self, group, device: torch.device, timeout_s: float | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = device
        self.timeout_s = collective_timeout() if timeout_s is None else float(timeout_s)
        self.side = group        # the group of the score all-gathers (see use_side_group)

    def use_side_group(self) -> None:
        """Run the score all-gathers (:meth:`start_all_gather`) on a second gloo group over the same
        ranks, so that they do not queue behind the gradient all-reduces in flight on the first
        (gloo runs one group's collectives in order). CPU and the default group only: creating a
        group is collective over every process, which only the whole world is sure to reach."""
        if self.device.type != "cpu" or self.group not in (None, dist.group.WORLD):
            return
        world = dist.group.WORLD
        entry = _SIDE_GROUPS.get(id(world))
        if entry is None or entry[0] is not world:
            entry = _SIDE_GROUPS[id(world)] = (world, dist.new_group(backend="gloo"))
        self.side = entry[1]

    def _run(self, what: str, start) -> None:
        try:
            if self.device.type == "cpu":
                work = start(True)
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            else:
                start(False)
        except RuntimeError as err:
            raise self.fault(f"the {what} collective", err) from err

    def fault(self, what: str, err: BaseException) -> DistributedFaultError:
        """The error that ends this rank when ``what`` (a collective, or FSDP's) failed with ``err``."""
        timed_out = "timed out" in str(err).lower() or "timeout" in str(err).lower()
        cause = (f"no answer within {self.timeout_s:g} s" if timed_out
                 else f"it failed: {str(err).splitlines()[0][:300] if str(err) else type(err).__name__}")
        return DistributedFaultError(
            f"drpost rank {self.rank} of {self.world}: {what} did not complete ({cause}). "
            "Another rank has crashed, was killed or hangs; this rank stops instead of waiting forever. "
            f"Check the other ranks' logs (the limit is {TIMEOUT_ENV}, in seconds).")

    def start_all_reduce(self, t: torch.Tensor) -> "PendingCollective":
        """Sum over ranks, in place, asynchronously: the returned handle's ``wait`` completes it
        (with the same deadline and the same :class:`DistributedFaultError` as the blocking calls)."""
        box = []

        def start(_):
            box.append(dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
            return _Done()
        self._run("gradient all-reduce (launch)", start)
        return PendingCollective(self, box[0], t)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[n, ...] on every rank (same shape everywhere) -> [world * n, ...] in rank order."""
        return self._start_all_gather(t, self.group).wait()

    def start_all_gather(self, t: torch.Tensor) -> "PendingCollective":
        """:meth:`all_gather` on the side group (:meth:`use_side_group`), asynchronously on CPU
        (gloo): the handle's ``wait`` returns the result. On a GPU it runs at once (NCCL orders it
        on the stream)."""
        return self._start_all_gather(t, self.side)

    def _start_all_gather(self, t: torch.Tensor, group) -> "PendingCollective":
        t = t.contiguous()
        out = torch.empty((self.world * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        if self.device.type != "cpu":
            self._run("all-gather", lambda async_op: _all_gather_single(out, t, group=group, async_op=False))
            return PendingCollective(self, None, out)
        box = []

        def start(_):
            box.append(_all_gather_single(out, t, group=group, async_op=True))
            return _Done()
        self._run("all-gather (launch)", start)
        return PendingCollective(self, box[0], out, "all-gather")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        self._run("all-reduce", lambda async_op: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group,
                                                                 async_op=async_op))
        return t


class _Done:
    def wait(self, timeout=None) -> bool:
        return True


class PendingCollective:
    """A collective in flight (:meth:`DistContext.start_all_reduce`, :meth:`DistContext.start_all_gather`);
    ``wait`` returns its result tensor."""

    def __init__(self, ctx: DistContext, work, tensor: torch.Tensor, what: str = "gradient all-reduce"):
        self.ctx, self.work, self.tensor, self.what = ctx, work, tensor, what

    def wait(self) -> torch.Tensor:
        work = self.work
        if work is not None:
            self.work = None
            if self.ctx.device.type == "cpu":
                self.ctx._run(self.what, lambda _: _waited(work, self.ctx.timeout_s))
            else:
                work.wait()       # NCCL: orders the stream; the watchdog bounds it
        return self.tensor


def _waited(work, timeout_s: float):
    work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    return _Done()


def resolve(process_group=None, distributed: bool | None = None, device=None) -> DistContext | None:
    """A DistContext when drpost should run distributed, else None.

    On when torch.distributed is initialised and the group has more than one process;
    ``distributed=False`` forces it off, ``distributed=True`` requires it."""
    if distributed is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed:
            raise ValueError("distributed=True but torch.distributed is not initialised: launch with torchrun "
                             "and call torch.distributed.init_process_group() before creating the DataRegularizer")
        return None
    if dist.get_world_size(process_group) <= 1:
        return None
    return DistContext(process_group, torch.device(device) if device is not None else torch.device("cpu"))


def is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


# ---------------------------------------------------------------------------------------------
# configuration check

def _digest(value) -> int:
    h = hashlib.sha256(repr(value).encode()).digest()
    return int.from_bytes(h[:8], "little", signed=True)


def short_digest(value) -> str:
    """A short, process-independent fingerprint of a value's repr (for long fields in error messages)."""
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


def check_same_config(ctx: DistContext, fields: dict) -> None:
    """All-gather a hash of every field; raise the same ValueError on every rank, naming the
    fields that differ (and each rank's value), when the ranks disagree."""
    names = list(fields)
    mine = torch.tensor([_digest(fields[n]) for n in names], dtype=torch.int64, device=ctx.device)
    every = ctx.all_gather(mine[None]).cpu()           # [world, F]
    differ = [n for j, n in enumerate(names) if not bool((every[:, j] == every[0, j]).all())]
    if not differ:
        return
    values = [None] * ctx.world                         # only on this error path: who has what
    dist.all_gather_object(values, {n: fields[n] for n in differ}, group=ctx.group)
    detail = "; ".join(f"{n}: " + ", ".join(f"rank {r}={values[r][n]!r}" for r in range(ctx.world))
                       for n in differ)
    raise ValueError(f"drpost: the {ctx.world} ranks were given different configurations ({detail}); every "
                     "rank must build the same model and DataRegularizer options for the global selection")


def check_same_batch_size(ctx: DistContext, sizes: list[int]) -> None:
    if len(set(sizes)) > 1:
        raise ValueError(f"drpost: the general batch has a different number of rows on each rank ({sizes}); the "
                         "global selection needs the same batch size B on every rank (shard the data evenly, "
                         "e.g. drop_last or even_batches)")


# ---------------------------------------------------------------------------------------------
# target rows

ROW_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


def gather_rows(ctx: DistContext, batch: dict | None, pad_id: int, extra=()) -> tuple[dict | None, torch.Tensor]:
    """Every rank's rows of ``batch`` (a checked batch, or None = no rows here), concatenated in rank
    order and right-padded to the longest sequence: pad id, attention 0, labels -100. Two collectives:
    the sizes (with the integers ``extra`` of every rank, returned as [world, len(extra)]), then the
    padded rows. input_ids, attention_mask and labels travel; when some rank's rows are packed
    (padding-free: ``position_ids`` restarting inside a row), every row travels with its positions
    instead of an attention mask (an ordinary row gets 0..T-1; padding continues the last position, so
    it stays in its row's last sample with labels -100) and the result is a packed batch."""
    n, t = (batch["input_ids"].shape[0], batch["input_ids"].shape[1]) if batch is not None else (0, 0)
    packed = int(batch is not None and not batch["_layout"].identity)
    head = torch.tensor([[n, t, packed, *extra]], dtype=torch.int64, device=ctx.device)
    heads = ctx.all_gather(head).cpu()
    rows, seqs, positions = heads[:, 0].tolist(), heads[:, 1].tolist(), bool(heads[:, 2].any())
    if sum(rows) == 0:
        return None, heads[:, 3:]
    big_n, big_t = max(rows), max(seqs)
    keys = ROW_KEYS if positions else ROW_KEYS[:3]
    payload = torch.empty((len(keys), big_n, big_t), dtype=torch.int64, device=ctx.device)
    for j, value in enumerate((pad_id, 0, IGNORE_INDEX)):
        payload[j].fill_(value)
        if n:
            # a packed batch has no attention_mask; it travels as ones and is dropped below
            payload[j, :n, :t] = batch[keys[j]] if keys[j] in batch else 1
    if positions:
        cols = torch.arange(big_t, device=ctx.device)
        payload[3].copy_(cols.expand(big_n, big_t))
        if n:
            pos = batch.get("position_ids")
            pos = cols[:t].expand(n, t) if pos is None else pos.to(ctx.device, torch.int64)
            payload[3, :n, :t] = pos
            payload[3, :n, t:] = pos[:, -1:] + 1 + torch.arange(big_t - t, device=ctx.device)
    full = ctx.all_gather(payload).view(ctx.world, len(keys), big_n, big_t)
    stacked = torch.cat([full[r, :, :rows[r]] for r in range(ctx.world) if rows[r]], dim=1)
    out = dict(zip(keys, stacked.unbind(0)))
    if positions:
        out.pop("attention_mask")
    return out, heads[:, 3:]


# ---------------------------------------------------------------------------------------------
# scores

class PendingScores:
    """A score gather in flight (:func:`start_gather_scores`): ``result()`` waits for it."""

    def __init__(self, ctx: DistContext, pending: PendingCollective, width: int, rest: tuple, counts):
        self.ctx, self.pending, self.width, self.rest, self.counts = ctx, pending, width, rest, counts

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        full, world, width, counts = self.pending.wait(), self.ctx.world, self.width, self.counts
        tags = full[:, 0]
        same = (tags == tags[0]).all()
        per_rank = full[:, 1:].reshape((world, width) + self.rest)
        if counts and len(set(counts)) > 1:
            return torch.cat([per_rank[r, :counts[r]] for r in range(world)]), same
        return per_rank.reshape((world * width,) + self.rest), same


def start_gather_scores(ctx: DistContext, scores: torch.Tensor, tag: int,
                        counts: list[int] | None = None) -> PendingScores:
    """Launch the gather of every rank's local scores [B] or [B, R] (asynchronously on CPU); the
    handle's ``result()`` gives (the ranks' scores concatenated along dim 0, as float64, which is
    exact for the float32/float64 scores drpost computes, so the selection sees the same order and
    ties; a device flag, True when every rank sent the same ``tag``). ``counts``: the samples of every
    rank when they differ (packed batches); each rank's scores are padded to the largest count for
    the gather and cut back after it. The tag (the group index) catches ranks that process their
    layers in a different order; the flag is checked at the end of the step (see ``check_tags``), so
    the backward needs no host synchronisation."""
    b, rest = scores.shape[0], tuple(scores.shape[1:])
    width = max(counts) if counts else b
    flat = scores.detach().to(torch.float64).reshape(b, -1)
    if width > b:
        flat = torch.cat([flat, flat.new_zeros(width - b, flat.shape[1])])
    payload = torch.cat([torch.full((1,), float(tag), dtype=torch.float64, device=scores.device), flat.flatten()])
    return PendingScores(ctx, ctx.start_all_gather(payload[None]), width, rest, counts)   # [world, 1 + width * R]


def check_tags(ok: torch.Tensor | None) -> None:
    """Raise (on every rank: the gathered tags are the same everywhere) if some score gather paired
    different layers."""
    if ok is not None and not bool(ok):
        raise RuntimeError("drpost: the ranks scored different layers in the same collective; every rank must "
                           "run the same model and the same code path")


# ---------------------------------------------------------------------------------------------
# gradients (blocking; the replicated reduction overlaps its own: drpost.engine.overlap)

def all_reduce_tensors(ctx: DistContext, tensors: list, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum every tensor over the ranks, in place: consecutive tensors of one dtype/device are
    flattened into buckets of at most ``bucket_bytes`` (a tensor that large goes alone, without a
    copy), so a model's gradients take a few collectives. Every rank must pass tensors of the same
    shapes in the same order."""
    with torch.no_grad():       # accumulators may be views made under no_grad (e.g. inside the backward)
        _all_reduce_buckets(ctx, tensors, bucket_bytes)


def _all_reduce_buckets(ctx: DistContext, tensors: list, bucket_bytes: int) -> None:
    bucket: list = []
    size = 0

    def flush():
        nonlocal bucket, size
        if len(bucket) == 1 and bucket[0].is_contiguous():
            ctx.all_reduce(bucket[0])
        elif bucket:
            flat = ctx.all_reduce(torch.cat([t.reshape(-1) for t in bucket]))
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        bucket, size = [], 0

    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + nbytes > bucket_bytes):
            flush()
        bucket.append(t)
        size += nbytes
    flush()


class LaunchRanks:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one), for the recipes.

    Under torchrun (``WORLD_SIZE`` > 1) it initialises the default process group if nobody has
    (gloo on CPU, NCCL when CUDA is available); the engine's collectives then run on it."""

    def __init__(self):
        import os

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_masks(self, masks: dict) -> dict:
        """Every rank's local selection masks ([b] or [b, out] per layer) -> the whole batch's."""
        if self.world == 1 or not masks:
            return masks
        names = sorted(masks)
        flat = [masks[n].detach().to(torch.uint8).reshape(masks[n].shape[0], -1) for n in names]
        local = torch.cat(flat, dim=1).contiguous()
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local)
        full = torch.cat(out, dim=0).cpu()
        res, col = {}, 0
        for n, f in zip(names, flat):
            m = full[:, col:col + f.shape[1]].bool()
            res[n] = m.reshape((full.shape[0],) + tuple(masks[n].shape[1:]))
            col += f.shape[1]
        return res
