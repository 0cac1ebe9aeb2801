"""The reduction of an FSDP2-sharded model (``torch.distributed.fsdp.fully_shard``).

Under ``fully_shard`` every parameter of a sharded module is a DTensor holding this rank's dim-0
shard; the full weight exists only while its module runs (FSDP all-gathers it before the forward
and again before the backward). drpost needs nothing else from it: each scored layer's tap sees
the layer's input activations and output gradients, which are full-size on every rank, so the
scores, the gathered selection (as under plain data parallelism, :mod:`drpost.distributed`) and
each group's chosen-sample gradient (an unsharded ``[out, in]`` accumulator) are computed as
before, and autograd never writes a scored weight's gradient, so FSDP's own post-backward
reduce-scatter skips those parameters. At ``finalize`` :class:`ShardedReduction`:

* divides each accumulator by its global chosen-token count (one small all-reduce, as under data
  parallelism), then **reduce-scatters** the accumulators in flat buckets (each tensor padded to
  ``world * ceil(rows / world)`` rows, FSDP's dim-0 chunking) so every rank receives the summed
  gradient of its own shard, wrapped as a DTensor with the parameter's mesh and placement: the
  stock optimizer steps it like any FSDP gradient;
* leaves the unscored sharded parameters (norms under the separate strategy) to FSDP: their
  autograd gradient was reduce-scattered by FSDP's post-backward hook and divided by its
  gradient-divide factor (the world size unless set), so drpost rescales it to the global token
  count; unscored parameters that are not sharded (a module left outside ``fully_shard``) are
  all-reduced as under data parallelism.

A parameter shared by two FSDP units (tied embeddings split over units) is refused by FSDP itself
at the first forward, on every rank. FSDP2 mixed precision works as is: the taps see bfloat16
activations, the accumulators are reduce-scattered in float32 at least (float64 stays float64)
and cast to the sharded parameter's dtype. Refused, with the reason: FSDP1
(``FullyShardedDataParallel``: flat parameters hide the layers), DTensor parameters without
``fully_shard`` (tensor parallelism), meshes other than one dimension with ``Shard(0)`` (HSDP) and
``greedy`` (as under data parallelism: its Gram matrix spans ranks).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import distributed as _dist
from .reduce import DistributedReduction, _age_target, add_grad

FSDP1_UNSUPPORTED = (
    "drpost does not support FSDP1 (FullyShardedDataParallel): it flattens each unit's parameters into "
    "one FlatParameter, so the layers drpost scores no longer own their weights. Shard the model with "
    "FSDP2 instead, torch.distributed.fsdp.fully_shard (per decoder layer, then the root; accelerate: "
    "fsdp_version: 2), which drpost supports.")


def refuse_fsdp1(model: torch.nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:   # a torch build without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(FSDP1_UNSUPPORTED)


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 units of ``model`` (the modules ``fully_shard`` was applied to)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(p, DTensor)


def sharded_context(model, units: list, process_group, distributed, device) -> _dist.DistContext:
    """The DistContext of a sharded model: its mesh's process group (one 1-D mesh, Shard(0))."""
    from torch.distributed.tensor import Shard

    if not units:
        raise ValueError("the model has DTensor parameters but no fully_shard unit (tensor parallelism?): drpost "
                         "supports FSDP2 (torch.distributed.fsdp.fully_shard) and plain data parallelism only")

    if distributed is False:
        raise ValueError("distributed=False with an FSDP-sharded model: its parameters are split over the "
                         "ranks, so drpost must reduce over them; drop distributed=False")
    meshes = {}
    for name, p in model.named_parameters():
        if not is_dtensor(p):
            continue
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"{name} is sharded as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; drpost "
                             "supports FSDP2 on a 1-D mesh (Shard(0) per parameter): no HSDP or tensor parallelism")
        m = p.device_mesh
        meshes[(m.device_type, tuple(m.mesh.flatten().tolist()))] = m
    if len(meshes) != 1:
        raise ValueError(f"the sharded parameters live on {len(meshes)} device meshes; drpost needs every "
                         "fully_shard unit on the same mesh")
    mesh = next(iter(meshes.values()))
    group = mesh.get_group()
    if process_group is not None and \
            dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group):
        raise ValueError("process_group differs from the FSDP mesh's group: drpost selects over the ranks the "
                         "model is sharded over; drop process_group")
    return _dist.DistContext(group, torch.device(device))


def _divide_factors(units: list, world: int) -> dict[int, float]:
    """{id(sharded parameter): the factor FSDP divides its reduce-scattered gradient by}. FSDP2 has
    a setter for it (``set_gradient_divide_factor``) but no getter, so it is read from FSDP's param
    group; a parameter not found there gets FSDP's default, the world size."""
    factors = {}
    for unit in units:
        state = getattr(unit, "_get_fsdp_state", lambda: None)()
        group = getattr(state, "_fsdp_param_group", None)
        if group is None:
            continue
        factor = getattr(group, "gradient_divide_factor", None)
        for fp in getattr(group, "fsdp_params", []):
            factors[id(fp.sharded_param)] = float(world if factor is None else factor)
    return factors


class ShardedReduction(DistributedReduction):
    """FSDP2: the selection of :class:`DistributedReduction`, gradients reduce-scattered to shards."""

    sharded = True

    def __init__(self, ctx: _dist.DistContext, pad_token_id: int, warn, units: list):
        super().__init__(ctx, pad_token_id, warn)
        self.divide = _divide_factors(units, ctx.world)

    def fault_of(self, err: BaseException):
        """FSDP's own all-gathers and reduce-scatters fail with the backend's error when a rank dies."""
        if isinstance(err, _dist.DistributedFaultError) or not isinstance(err, RuntimeError):
            return None
        text = str(err).lower()
        if isinstance(err, getattr(dist, "DistBackendError", ())) or \
                any(w in text for w in ("gloo", "nccl", "connection", "timed out", "broken pipe")):
            return self.ctx.fault("one of FSDP's collectives (all-gather or reduce-scatter)", err)
        return None

    def on_assembled(self, pipeline, group) -> None:
        """Nothing during the backward: the reduce-scatters run at finalize."""

    def finalize(self, pipeline, att, where: str) -> None:
        """The metadata all-reduce of data parallelism; then every chosen gradient divided by its
        global count and reduce-scattered into its shard (replicated parameters all-reduced)."""
        meta = self._reduce_metadata(pipeline, att, where)
        if meta is None:
            return
        ctx, step = self.ctx, pipeline.step
        source = dict(step.plain_acc)
        for g in att.groups:
            source.update(g.acc)
        scatter, replicated = [], []
        with torch.no_grad():
            for p, keep in zip(att.trainable, meta.present):
                if not keep:
                    continue
                acc, g = source.get(p), meta.group_of.get(p)
                if g is None and is_dtensor(acc):
                    # FSDP reduce-scattered it already: sum / factor -> sum / global tokens
                    factor = self.divide.get(id(p), float(ctx.world))
                    add_grad(p, acc * (factor / float(meta.plain.clamp_min(1))))
                    continue
                if acc is None:
                    acc = torch.zeros(p.shape, dtype=p.dtype, device=ctx.device)
                count = g.rows_broadcast(p, g.count.clamp_min(1)) if g is not None else meta.plain.clamp_min(1)
                full = acc / count.to(acc.dtype)
                (scatter if is_dtensor(p) else replicated).append((p, full))
            _dist.all_reduce_tensors(ctx, [t for _, t in replicated])
            for p, full in replicated:
                add_grad(p, full)
            for p, local in zip([p for p, _ in scatter], reduce_scatter_tensors(ctx, [t for _, t in scatter])):
                add_grad(p, as_shard_of(p, local))
        _age_target(pipeline)


# ---------------------------------------------------------------------------------------------
# reduce-scatter to FSDP's dim-0 shards

def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(start, length) of ``rank``'s dim-0 shard of ``rows`` rows, as FSDP2 (``torch.chunk``) cuts it."""
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    return start, max(0, min(start + chunk, rows) - start)


def reduce_scatter_tensors(ctx: _dist.DistContext, tensors: list, bucket_bytes: int = _dist.BUCKET_BYTES) -> list:
    """Sum full-size tensors over the ranks and return this rank's dim-0 shard of each (FSDP2's
    chunking). Tensors are reduced in buckets of one dtype (float32 at least); every rank must pass
    the same shapes in the same order."""
    out: list = [None] * len(tensors)
    bucket: list = []
    size = 0

    def flush():
        nonlocal bucket, size
        if bucket:
            for i, local in zip(bucket, _reduce_scatter_bucket(ctx, [tensors[i] for i in bucket])):
                out[i] = local
        bucket, size = [], 0

    for i, t in enumerate(tensors):
        dtype = torch.promote_types(t.dtype, torch.float32)
        nbytes = t.numel() * dtype.itemsize
        if bucket and (dtype != torch.promote_types(tensors[bucket[0]].dtype, torch.float32)
                       or size + nbytes > bucket_bytes):
            flush()
        bucket.append(i)
        size += nbytes
    flush()
    return out


def _reduce_scatter_bucket(ctx: _dist.DistContext, tensors: list) -> list:
    world = ctx.world
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    columns, chunks = [], []
    for t in tensors:
        rows = t.shape[0]
        chunk = math.ceil(rows / world)
        flat = t.to(dtype).reshape(rows, -1)
        if chunk * world != rows:
            flat = torch.cat([flat, flat.new_zeros((chunk * world - rows, flat.shape[1]))])
        columns.append(flat.reshape(world, -1))          # rank r's rows are row r
        chunks.append(chunk)
    stacked = torch.cat(columns, dim=1).contiguous()      # [world, S]
    local = torch.empty(stacked.shape[1], dtype=dtype, device=stacked.device)
    ctx._run("reduce-scatter", lambda async_op: dist.reduce_scatter_tensor(
        local, stacked.reshape(-1), op=dist.ReduceOp.SUM, group=ctx.group, async_op=async_op))
    res, offset = [], 0
    for t, col, chunk in zip(tensors, columns, chunks):
        width = col.shape[1]
        start, length = shard_rows(t.shape[0], world, ctx.rank)
        piece = local[offset:offset + width].view(chunk, *t.shape[1:])[:length]
        res.append(piece)
        offset += width
    return res


def as_shard_of(p, local: torch.Tensor):
    """``local`` (this rank's rows of p's gradient) as a DTensor laid out like the parameter ``p``."""
    from torch.distributed.tensor import DTensor

    want = tuple(p.to_local().shape)
    if tuple(local.shape) != want:
        raise RuntimeError(f"drpost: a reduce-scattered gradient has shape {tuple(local.shape)} but the "
                           f"parameter's local shard has {want} (FSDP sharding drpost does not know)")
    return DTensor.from_local(local.to(p.dtype).contiguous(), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())
