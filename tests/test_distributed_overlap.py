"""The distributed gradient all-reduce is launched during the backward, not after it.

A one-process gloo group drives :class:`DistributedReduction` directly (the order of events does not
depend on the number of ranks; tests/test_distributed.py proves 2 ranks equal one process). Each
parameter is its own bucket, and the events are recorded in the order they happen: a bucket
launched (``on_launch``) and the backward reaching the first decoder layer (a hook on its output's
gradient). The last layer's gradients must be launched before the first layer's backward ran
(layerwise: right after its own assembly; global: not before the one decision, after the
backward), and the ``.grad`` written must equal the one-process run's (the oracle), also with
gradient accumulation, where only the finalize call may launch anything.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import models_tiny as mt


@pytest.fixture()
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _model():
    return mt.llama(tied=True, num_layers=3, seed=3).double()


def _run(scope: str, distributed: bool, micro: int = 1, window: int | None = None):
    from drpost import DataRegularizer
    from drpost import distributed as _dist
    from drpost.engine.reduce import DistributedReduction

    m = _model()
    reg = DataRegularizer(m, feasible_set="filter", scope=scope, frac=0.5, distributed=False)
    events = []
    if distributed:
        red = DistributedReduction(_dist.DistContext(dist.group.WORLD, torch.device("cpu")), mt.PAD_ID, reg._warn)
        red.bucket_bytes = 1                      # every parameter its own bucket: launched as soon as final
        if window is not None:
            red.decision_window = window          # layerwise choices left open while the backward goes on
        names = {p: n for n, p in m.named_parameters()}
        red.on_launch = lambda params: events.extend(("launch", names[p]) for p in params)
        reg._reduction = reg._pipeline.reduction = red

    def first_layer_output(mod, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden.register_hook(lambda g: events.append(("backward", "layers.0")))
    m.model.layers[0].register_forward_hook(first_layer_output)
    general, target = mt.make_batch(4, 10, seed=5), mt.make_batch(2, 10, seed=6)
    for j in range(micro):
        part = mt.slice_batch(general, slice(j * 4 // micro, (j + 1) * 4 // micro)) if micro > 1 else general
        events.append(("call", j))
        reg.backward(part, target, finalize=j == micro - 1)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return events, grads


@pytest.mark.parametrize("scope,micro,window", [("layer", 1, 0), ("layer", 2, 0), ("layer", 1, None),
                                                ("layer", 1, 3), ("global", 1, None)])
def test_reduction_is_launched_during_the_backward(one_rank_group, scope, micro, window):
    events, grads = _run(scope, distributed=True, micro=micro, window=window)
    _, ref = _run(scope, distributed=False, micro=micro)
    assert grads.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-12, atol=1e-12, msg=n)

    last_call = events.index(("call", micro - 1))
    assert not [e for e in events[:last_call] if e[0] == "launch"], "a non-finalize call launched a reduction"
    events = events[last_call:]
    first_bwd = [i for i, e in enumerate(events) if e == ("backward", "layers.0")][-1]
    launched = {n: i for i, (kind, n) in enumerate(events) if kind == "launch"}
    assert set(launched) == set(ref), "every parameter with a gradient is reduced exactly once"
    last_layer = [n for n in launched if n.startswith("model.layers.2.") and "proj" in n]
    first_layer = [n for n in launched if n.startswith("model.layers.0.") and "proj" in n]
    assert last_layer and first_layer
    if scope == "layer" and window is not None and window < 7:
        # the last decoder layer's reduction was in flight before the first layer's backward ran
        # (its 7 choices finished once 7 later groups were scored, at the latest)
        assert all(launched[n] < first_bwd for n in last_layer), events
    elif scope == "layer":
        # the default window (8 groups) is wider than this 3-layer model's layers: the last layer's
        # reduction starts during the backward of the next, before the first layer's
        assert max(launched[n] for n in last_layer) < min(launched[n] for n in first_layer), events
    else:
        # global: one decision after the backward, then each group's reduction right after its assembly
        assert all(launched[n] > first_bwd for n in last_layer + first_layer), events
    # the plain (unscored) parameters are final only after the backward
    norms = [n for n in launched if n.endswith("norm.weight")]
    assert norms and all(launched[n] > first_bwd for n in norms)


class _DoublingContext:
    """A stand-in for DistContext: 'all-reduce over 2 identical ranks' = double in place; records sizes."""

    def __init__(self):
        self.launched = []

    def start_all_reduce(self, t):
        self.launched.append(t)
        t.mul_(2)

        class Done:
            def wait(self_inner):
                return t
        return Done()


def test_large_tensors_are_reduced_alone_and_in_place_small_ones_packed():
    from drpost.engine.overlap import GradientBuckets

    ctx = _DoublingContext()
    buckets = GradientBuckets(ctx, bucket_bytes=64, alone_bytes=1024)
    big = torch.randn(16, 32)                     # 2 KiB: alone, no copy
    wide = torch.randn(32, 16).t()                # 2 KiB, not contiguous: alone, as a copy
    small = [torch.randn(4) for _ in range(6)]    # 16 B each: packed 4 to a 64-byte bucket
    originals = {"big": big.clone(), "wide": wide.clone(), **{f"s{i}": s.clone() for i, s in enumerate(small)}}
    buckets.add("s0", small[0])
    buckets.add("big", big)
    for i in range(1, 6):
        buckets.add(f"s{i}", small[i])
    buckets.add("wide", wide)
    out = buckets.wait()
    # launches: big at once (the open bucket keeps filling), the full bucket s0-s3, wide, then s4-s5 at wait
    assert [t.numel() for t in ctx.launched] == [512, 16, 512, 8]
    assert ctx.launched[0].data_ptr() == big.data_ptr(), "a large contiguous tensor is reduced in place"
    assert out.keys() == originals.keys()
    for k, v in originals.items():
        torch.testing.assert_close(out[k], 2 * v, rtol=0, atol=0, msg=k)
        assert out[k].shape == v.shape
