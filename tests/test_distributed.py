"""drpost under torch.distributed (gloo on CPU, 2 processes) equals one process on the concatenated batch.

The two workers are started once (this file run as a script, one subprocess per rank, a free TCP
port, a hard timeout so a hang fails instead of blocking) and run every configuration in one go:
the engine matrix (feasible set x scoring x target strategy, accumulation, rowwise, random,
standard, target_only; checkpointed ranks against one process without checkpointing), a rank whose
every sample is filtered out, non-finite steps, the errors
that must reach every rank (mismatched configurations, unequal batch sizes, a DDP-wrapped model)
and the Hugging Face trainer. The single-process references run in the pytest process.

Each rank gets its contiguous shard of every global general batch and a contiguous slice of the
target batch, trimmed to its own longest row, so the engine's padded gather of target rows of
different lengths is exercised.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import models_tiny as mt
from dist_launch import Results, errors, init_worker, part_of, worker_main

WORLD = 2
B, V, SEQ, STEPS, FRAC, LR = 4, 3, 10, 3, 0.5, 0.1
TIMEOUT_S = 150           # the whole launch (both ranks, every configuration)

CASES = {f"{fset}-{scoring}-{strategy}": dict(feasible_set=fset, scoring=scoring, target_strategy=strategy)
         for fset in ("layerwise", "global", "filter") for scoring in ("auto", "sketch")
         for strategy in ("merged", "separate")}
CASES.update({
    "filter-global-cosine": dict(feasible_set="filter", scope="global", score_norm="cosine"),
    "rowwise": dict(feasible_set="rowwise"),
    "random-layer": dict(feasible_set="random"),
    "random-global": dict(feasible_set="random", scope="global"),
    "layerwise-per_token-refresh2": dict(feasible_set="layerwise", target_strategy="separate", refresh_every=2,
                                         score_norm="per_token"),
    "standard": dict(feasible_set="standard"),
    "target_only": dict(feasible_set="target_only"),
    "global-recompute-merged": dict(feasible_set="global", global_memory="recompute"),
    "filter-global-recompute-separate": dict(feasible_set="filter", scope="global", target_strategy="separate",
                                             global_memory="recompute"),
})
ACCUMULATE = {"layerwise-accumulate": dict(feasible_set="layerwise"),
              "global-accumulate-separate": dict(feasible_set="global", target_strategy="separate"),
              "global-recompute-accumulate": dict(feasible_set="global", global_memory="recompute")}
# activation checkpointing on the ranks (HF, use_reentrant as given); the reference runs without it
CHECKPOINTED = {"layerwise-merged-ckpt": (dict(feasible_set="layerwise"), False),
                "global-separate-ckpt-reentrant": (dict(feasible_set="global", target_strategy="separate"), True)}
# every gradient all-reduced by itself, in place (DistributedReduction.alone_bytes = 1): the tiny
# model's gradients are all below the default 1 MiB, so CASES exercise the packed buckets
ALONE = {"layerwise-reduced-alone": dict(feasible_set="layerwise"),
         "global-separate-reduced-alone": dict(feasible_set="global", target_strategy="separate")}
for _kw in CASES.values():
    if _kw.get("scoring") == "sketch":
        _kw["sketch"] = "gaussian-8x8"


# ---------------------------------------------------------------------------------------------
# data

def model():
    return mt.llama(tied=True, seed=1)      # tied embedding/lm_head, RMSNorm, attention, MLP


def trim(batch: dict) -> dict:
    """Drop trailing columns that are padding in every row."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] for k, v in batch.items()}


def shard(batch: dict, rank: int, world: int = WORLD) -> dict | None:
    n = batch["input_ids"].shape[0]
    rows = slice(rank * n // world, (rank + 1) * n // world)
    if rows.start == rows.stop:
        return None
    return trim(mt.slice_batch(batch, rows))


def global_batches():
    general = [mt.make_batch(WORLD * B, SEQ, seed=100 + s) for s in range(STEPS)]
    target = [mt.make_batch(V, SEQ, seed=200 + s) for s in range(STEPS)]
    return general, target


def negative_rank_batch():
    """A general batch whose second half (rank 1's shard) has only negative global scores against
    the target at the first step, so ``filter`` (frac=1, global scope) keeps none of rank 1's rows."""
    from drpost import DataRegularizer

    pool, target = mt.make_batch(24, SEQ, seed=300), mt.make_batch(V, SEQ, seed=301)
    reg = DataRegularizer(model(), feasible_set="filter", scope="global", frac=1.0, distributed=False)
    reg.backward(pool, target)
    scores = reg.last_global_scores
    neg = (scores < 0).nonzero().flatten().tolist()
    pos = (scores >= 0).nonzero().flatten().tolist()
    assert len(neg) >= B + 2 and len(pos) >= 2, scores
    rows = pos[:2] + neg[B:B + 2] + neg[:B]          # rank 0: two kept, two negatives; rank 1: negatives only
    return mt.slice_batch(pool, rows), target


# ---------------------------------------------------------------------------------------------
# one run (used by the workers and by the single-process references)

def run_engine(kw, general, target, rank=0, world=1, micro=1, nan_step=None, reentrant=None, **extra):
    """STEPS optimizer steps of SGD; masks of this process's rows, selection counts, parameters.
    ``reentrant`` not None: with HF activation checkpointing (use_reentrant as given)."""
    from drpost import DataRegularizer

    m = model()
    if reentrant is not None:
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if nan_step is not None:
        poison = {"on": False}
        m.get_input_embeddings().register_forward_hook(lambda mod, i, o: o * float("nan") if poison["on"] else None)
    reg = DataRegularizer(m, frac=extra.pop("frac", FRAC), distributed=world > 1 or None, **kw, **extra)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
    masks, selected, skipped = [], [], []
    for step in range(STEPS):
        if nan_step is not None:
            poison["on"] = step == nan_step and rank == world - 1
        g = general[step] if world == 1 else shard(general[step], rank, world)
        t = target[step] if world == 1 else shard(target[step], rank, world)
        opt.zero_grad(set_to_none=True)
        n = g["input_ids"].shape[0]
        for j in range(micro):
            part = mt.slice_batch(g, slice(j * n // micro, (j + 1) * n // micro)) if micro > 1 else g
            stats = reg.backward(part, t, finalize=j == micro - 1)
        opt.step()
        masks.append({k: v.clone() for k, v in reg.last_masks.items()})
        selected.append({k: float(v) for k, v in stats.selected.items()})
        skipped.append(stats.skipped)
    return {"masks": masks, "selected": selected, "skipped": skipped, "distributed": reg.distributed,
            "params": {n: p.detach().clone() for n, p in m.named_parameters()}}


def accumulate_reference(kw, general, target):
    """Single process, 2 micro-batches per step: micro-batch j is the concatenation of every rank's
    j-th half shard (what the distributed run accumulates)."""
    halves = []
    for g in general:
        shards = [mt.slice_batch(g, slice(r * B, (r + 1) * B)) for r in range(WORLD)]
        halves.append([mt.cat_batches(*[mt.slice_batch(s, slice(j * B // 2, (j + 1) * B // 2)) for s in shards])
                       for j in range(2)])
    from drpost import DataRegularizer

    m = model()
    reg = DataRegularizer(m, frac=FRAC, **kw)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
    masks = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        step_masks = {}
        for j in range(2):
            reg.backward(halves[step][j], target[step], finalize=j == 1)
            for k, v in reg.last_masks.items():
                step_masks.setdefault(k, []).append(v.clone())
        opt.step()
        masks.append(step_masks)
    return {"masks": masks, "params": {n: p.detach().clone() for n, p in m.named_parameters()}}


def hf_rows(n, seed, seq=12):
    b = mt.make_batch(n, seq, seed)
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def run_hf(out_dir: str, per_device: int):
    from drpost.integrations import DrPostArguments, DrPostTrainer

    args = DrPostArguments(output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=per_device,
                           learning_rate=1e-2, max_steps=3, logging_steps=1, save_strategy="no", seed=0,
                           disable_tqdm=True, dataloader_num_workers=0, target_batch_size=4, frac=0.5)
    m = mt.llama(tied=False)
    t = DrPostTrainer(model=m, args=args, train_dataset=hf_rows(32, seed=11), target_dataset=hf_rows(16, seed=12))
    t.train()
    logs = [{k: r[k] for k in ("loss", "selected_mean") if k in r} for r in t.state.log_history if "loss" in r]
    wrapped = type(t.model_wrapped).__name__
    return {"params": {n: p.detach().clone() for n, p in m.named_parameters()}, "logs": logs, "wrapped": wrapped,
            "world": t.args.world_size, "distributed": t.regularizer.distributed,
            "masks": {k: v.clone() for k, v in t.regularizer.last_masks.items()}}


# ---------------------------------------------------------------------------------------------
# packed (padding-free) batches: a sample is a sequence, so the ranks hold different numbers of them

PACKED = {"packed-layerwise": dict(feasible_set="layerwise"),
          "packed-global-separate": dict(feasible_set="global", target_strategy="separate"),
          "packed-filter-global": dict(feasible_set="filter", scope="global"),
          "packed-random": dict(feasible_set="random")}
PACKED_G = ([[4, 5], [3, 3, 3]], [[9], [2, 7]])     # rank 0: 2 rows, 5 sequences; rank 1: 2 rows, 3 sequences


def packed_shards(step: int) -> list[tuple[dict, dict]]:
    """Per rank (general, target) of one step: packed general rows of 9 tokens; rank 0's target is one
    packed row of two sequences, rank 1's an ordinary padded row of 6 tokens (with an attention mask)."""
    from test_packed import packed_batch, padded_batch

    general = [packed_batch(PACKED_G[r], seed=400 + 10 * step + r) for r in range(WORLD)]
    target = [packed_batch([[4, 5]], seed=500 + step), padded_batch([[6]], seed=600 + step)]
    return list(zip(general, target))


def packed_reference_batches(step: int) -> tuple[dict, dict]:
    """What one process sees: the ranks' general rows stacked, and the target rows as the engine's
    gather rebuilds them (rank order, padded to 9 columns, positions for the ordinary row, padding
    continuing its last position with labels -100)."""
    (g0, t0), (g1, t1) = packed_shards(step)
    general = {k: torch.cat([g0[k], g1[k]]) for k in ("input_ids", "position_ids", "labels")}
    n = t1["input_ids"].shape[1]
    width = t0["input_ids"].shape[1]
    ids = torch.zeros(1, width, dtype=torch.long)
    labels = torch.full((1, width), -100, dtype=torch.long)
    ids[:, :n], labels[:, :n] = t1["input_ids"], t1["labels"]
    target = {"input_ids": torch.cat([t0["input_ids"], ids]), "labels": torch.cat([t0["labels"], labels]),
              "position_ids": torch.cat([t0["position_ids"], torch.arange(width)[None]])}
    return general, target


def run_packed(kw, rank=0, world=1):
    from drpost import DataRegularizer

    m = model()
    reg = DataRegularizer(m, frac=FRAC, pad_token_id=0, distributed=world > 1 or None, **kw)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
    masks, selected = [], []
    for step in range(STEPS):
        g, t = packed_shards(step)[rank] if world > 1 else packed_reference_batches(step)
        opt.zero_grad(set_to_none=True)
        stats = reg.backward(g, t)
        opt.step()
        masks.append({k: v.clone() for k, v in reg.last_masks.items()})
        selected.append({k: float(v) for k, v in stats.selected.items()})
    return {"masks": masks, "selected": selected, "distributed": reg.distributed,
            "params": {n: p.detach().clone() for n, p in m.named_parameters()}}


# ---------------------------------------------------------------------------------------------
# the workers

def _worker(out: Path) -> None:
    import torch.distributed as dist
    from drpost import DataRegularizer

    rank, world = init_worker()
    data = torch.load(out / "inputs.pt", weights_only=False)
    general, target = data["general"], data["target"]
    res = Results()
    part = res.part

    for name, kw in CASES.items():
        part(name, lambda: run_engine(kw, general, target, rank, world))
    for name, kw in ACCUMULATE.items():
        part(name, lambda: run_engine(kw, general, target, rank, world, micro=2))
    for name, (kw, reentrant) in CHECKPOINTED.items():
        part(name, lambda: run_engine(kw, general, target, rank, world, reentrant=reentrant))
    from drpost.engine.reduce import DistributedReduction
    default, DistributedReduction.alone_bytes = DistributedReduction.alone_bytes, 1
    try:
        for name, kw in ALONE.items():
            part(name, lambda: run_engine(kw, general, target, rank, world))
    finally:
        DistributedReduction.alone_bytes = default
    neg_g, neg_t = data["negative"]
    part("filter-empty-rank", lambda: run_engine(dict(feasible_set="filter", scope="global"), [neg_g] * STEPS,
                                                 [neg_t] * STEPS, rank, world, frac=1.0))
    part("nan-skip", lambda: run_engine(dict(feasible_set="layerwise", nonfinite="skip"), general, target,
                                        rank, world, nan_step=1))
    part("nan-error", lambda: {"raised": errors(lambda: run_engine(dict(feasible_set="layerwise"), general,
                                                                    target, rank, world, nan_step=1))})
    part("mismatch", lambda: {"raised": errors(lambda: DataRegularizer(model(), frac=0.5 if rank == 0 else 0.25))})

    def unequal():
        reg = DataRegularizer(model(), frac=FRAC)
        g = shard(general[0], rank, world)
        if rank == 1:
            g = mt.slice_batch(g, slice(0, B - 1))
        return {"raised": errors(lambda: reg.backward(g, shard(target[0], rank, world)))}

    part("unequal-batch", unequal)

    for name, kw in PACKED.items():
        part(name, lambda: run_packed(kw, rank, world))

    def ddp():
        wrapped = torch.nn.parallel.DistributedDataParallel(model())
        return {"raised": errors(lambda: DataRegularizer(wrapped))}

    part("ddp", ddp)
    part("hf", lambda: run_hf(str(out / "hf"), per_device=4))
    torch.save(res, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def launch(out: Path, timeout: float = TIMEOUT_S) -> list:
    from dist_launch import launch as start

    return start(__file__, out, timeout, WORLD)


if __name__ == "__main__":
    worker_main(_worker)


# ---------------------------------------------------------------------------------------------
# the tests (pytest process)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data():
    general, target = global_batches()
    return {"general": general, "target": target, "negative": negative_rank_batch()}


@pytest.fixture(scope="module")
def ranks(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torch.save(data, out / "inputs.pt")
    start = time.perf_counter()
    results = launch(out)
    results[0]["timing"]["launch"] = time.perf_counter() - start
    return results


part = part_of


def assert_same_run(got, ref, masks_too=True):
    """Every rank has the reference parameters (and identical ones); the ranks' masks, concatenated
    in rank order, are the reference masks."""
    for name, p in ref["params"].items():
        torch.testing.assert_close(got[0]["params"][name], p, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
        assert torch.equal(got[0]["params"][name], got[1]["params"][name]), f"ranks differ on {name}"
    if not masks_too:
        return
    for step in range(STEPS):
        assert got[0]["masks"][step].keys() == ref["masks"][step].keys()
        for layer, mask in ref["masks"][step].items():
            joined = torch.cat([g["masks"][step][layer] for g in got])
            assert torch.equal(joined, mask), f"step {step}, {layer}: {joined.tolist()} != {mask.tolist()}"


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(ranks, data, name):
    got = part(ranks, name)
    ref = run_engine(CASES[name], data["general"], data["target"])
    assert got[0]["distributed"] and got[1]["distributed"] and not ref["distributed"]
    assert_same_run(got, ref)
    assert got[0]["selected"] == got[1]["selected"] == ref["selected"]   # counts over all ranks


@pytest.mark.parametrize("name", list(ALONE))
def test_gradients_reduced_alone_equal_one_process(ranks, data, name):
    got = part(ranks, name)
    ref = run_engine(ALONE[name], data["general"], data["target"])
    assert_same_run(got, ref)
    assert got[0]["selected"] == got[1]["selected"] == ref["selected"]


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_two_checkpointed_ranks_equal_one_process_without(ranks, data, name):
    got = part(ranks, name)
    ref = run_engine(CHECKPOINTED[name][0], data["general"], data["target"])
    assert_same_run(got, ref)
    assert got[0]["selected"] == got[1]["selected"] == ref["selected"]


@pytest.mark.parametrize("name", list(ACCUMULATE))
def test_gradient_accumulation(ranks, data, name):
    got = part(ranks, name)
    ref = accumulate_reference(ACCUMULATE[name], data["general"], data["target"])
    assert_same_run(got, ref, masks_too=False)
    for step in range(STEPS):       # the last micro-batch's masks: rank halves of the reference's last one
        for layer, masks in ref["masks"][step].items():
            joined = torch.cat([g["masks"][step][layer] for g in got])
            assert torch.equal(joined, masks[-1]), (step, layer)


def test_rank_with_every_sample_filtered_out(ranks, data):
    got = part(ranks, "filter-empty-rank")
    g, t = data["negative"]
    ref = run_engine(dict(feasible_set="filter", scope="global"), [g] * STEPS, [t] * STEPS, frac=1.0)
    first = got[1]["masks"][0]
    assert all(not bool(m.any()) for m in first.values()), "rank 1 should keep no sample at the first step"
    assert any(bool(m.any()) for m in got[0]["masks"][0].values())
    assert_same_run(got, ref)


def test_nonfinite_step_is_skipped_on_every_rank(ranks, data):
    got = part(ranks, "nan-skip")
    assert got[0]["skipped"] == got[1]["skipped"] == [False, True, False]
    for name in got[0]["params"]:
        assert torch.equal(got[0]["params"][name], got[1]["params"][name])
    raised = [g["raised"] for g in part(ranks, "nan-error")]
    assert all(r is not None and r.startswith("NonFiniteError") and "rank(s) [1]" in r for r in raised), raised


def test_mismatched_configs_fail_on_every_rank(ranks):
    raised = [g["raised"] for g in part(ranks, "mismatch")]
    for r in raised:
        assert r is not None and r.startswith("ValueError"), raised
        assert "frac: rank 0=0.5, rank 1=0.25" in r, r


def test_unequal_batch_sizes_fail_on_every_rank(ranks):
    raised = [g["raised"] for g in part(ranks, "unequal-batch")]
    assert all(r is not None and "different number of rows on each rank ([4, 3])" in r for r in raised), raised


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_batches_equal_one_process(ranks, name):
    """Packed general rows with 5 and 3 sequences on the two ranks, a packed and an ordinary target
    row: the same masks (per sequence), counts and parameters as one process on the stacked rows."""
    got = part(ranks, name)
    ref = run_packed(PACKED[name])
    assert got[0]["distributed"] and not ref["distributed"]
    assert [m[next(iter(m))].shape[0] for m in got[0]["masks"]] == [5] * STEPS     # rank 0's 5 sequences
    assert [m[next(iter(m))].shape[0] for m in got[1]["masks"]] == [3] * STEPS
    assert_same_run(got, ref)
    assert got[0]["selected"] == got[1]["selected"] == ref["selected"]


def test_ddp_wrapped_model_is_refused(ranks):
    from drpost import DataRegularizer

    raised = [g["raised"] for g in part(ranks, "ddp")]
    assert all(r is not None and "pass the unwrapped module" in r for r in raised), raised
    fake = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(fake)
    with pytest.raises(ValueError, match="DistributedDataParallel-wrapped"):
        DataRegularizer(fake)


def test_hf_trainer_two_ranks_equal_one_process(ranks, tmp_path):
    got = part(ranks, "hf")
    ref = run_hf(str(tmp_path / "hf"), per_device=WORLD * 4)
    assert got[0]["world"] == WORLD and got[0]["distributed"] and not ref["distributed"]
    assert got[0]["wrapped"] == got[1]["wrapped"] == "LlamaForCausalLM"        # no DDP wrapper
    for name, p in ref["params"].items():
        torch.testing.assert_close(got[0]["params"][name], p, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
        assert torch.equal(got[0]["params"][name], got[1]["params"][name]), name
    for layer, mask in ref["masks"].items():
        assert torch.equal(torch.cat([g["masks"][layer] for g in got]), mask), layer
    assert [r["selected_mean"] for r in got[0]["logs"]] == [r["selected_mean"] for r in ref["logs"]]
    assert [r["loss"] for r in got[0]["logs"]] == pytest.approx([r["loss"] for r in ref["logs"]], rel=1e-6)


def test_layerwise_shares_differ_between_ranks(ranks):
    """The global top-k is not a per-rank top-k: some layer keeps more samples of one rank than of
    the other (so the test above exercises unequal shares)."""
    masks = [g["masks"] for g in part(ranks, "layerwise-auto-merged")]
    shares = {(int(masks[0][s][k].sum()), int(masks[1][s][k].sum())) for s in range(STEPS) for k in masks[0][s]}
    assert all(a + b == B for a, b in shares) and any(a != b for a, b in shares), shares


def test_single_process_is_untouched():
    """No process group: no distributed context, and distributed=True is refused with a hint."""
    from drpost import DataRegularizer

    assert DataRegularizer(model()).distributed is False
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        DataRegularizer(model(), distributed=True)


def test_fsdp2_one_rank_equals_the_unsharded_model(tmp_path):
    """FSDP2 (fully_shard per decoder layer and the root, CPU mesh of one gloo rank): the gradients
    land as DTensors and equal those of the unsharded model (2 ranks: tests/test_fsdp.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from drpost import DataRegularizer

    import torch.distributed as dist

    general, target = mt.make_batch(4, SEQ, seed=5), mt.make_batch(2, SEQ, seed=6)
    ref = model()
    DataRegularizer(ref, feasible_set="layerwise", frac=FRAC).backward(general, target)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = model()
        mesh = init_device_mesh("cpu", (1,))
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        reg = DataRegularizer(sharded, feasible_set="layerwise", frac=FRAC)
        assert reg.distributed
        reg.backward(general, target)
        for (name, p), q in zip(ref.named_parameters(), sharded.parameters()):
            assert type(q.grad).__name__ == "DTensor", name
            torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-9, atol=1e-12)
        from torch.distributed.tensor import Shard, distribute_tensor

        tp = model()                     # DTensor parameters without fully_shard (as tensor parallelism makes)
        tp.model.norm.weight = torch.nn.Parameter(distribute_tensor(tp.model.norm.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="DTensor parameters but no fully_shard unit"):
            DataRegularizer(tp, feasible_set="layerwise")
    finally:
        dist.destroy_process_group()
