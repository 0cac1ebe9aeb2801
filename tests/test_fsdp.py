"""drpost on an FSDP2-sharded model (``fully_shard`` per decoder layer, then the root; 2 gloo ranks on
CPU, float64) equals one process on the concatenated batch: every parameter to a relative error
below 1e-9, the same selections; the gradients land as DTensor shards the stock optimizer steps.

The two workers (this file run as a script) run every configuration in one launch; the
single-process references run in the pytest process. Also: FSDP2 mixed precision (bfloat16 params,
float32 reduce) trains close to the float32 run, and what is refused is refused on every rank.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import models_tiny as mt
from dist_launch import Results, errors, init_worker, part_of, worker_main
from test_distributed import B, FRAC, LR, STEPS, WORLD, assert_same_run, global_batches, shard  # the same batches

TIMEOUT_S = 240

CASES = {f"{fset}-{scoring}-{strategy}": dict(feasible_set=fset, scoring=scoring, target_strategy=strategy)
         for fset in ("layerwise", "global", "filter") for scoring in ("auto", "sketch")
         for strategy in ("merged", "separate")}
CASES.update({
    "rowwise": dict(feasible_set="rowwise"),
    "random-layer": dict(feasible_set="random"),
    "layerwise-pairwise": dict(feasible_set="layerwise", scoring="pairwise_ghost"),
    "layerwise-refresh2": dict(feasible_set="layerwise", target_strategy="separate", refresh_every=2),
    "standard": dict(feasible_set="standard"),
    "target_only": dict(feasible_set="target_only"),
    "global-recompute-merged": dict(feasible_set="global", global_memory="recompute"),
    "filter-global-recompute-separate": dict(feasible_set="filter", scope="global", target_strategy="separate",
                                             global_memory="recompute"),
})
for _kw in CASES.values():
    if _kw.get("scoring") == "sketch":
        _kw["sketch"] = "gaussian-8x8"
ACCUMULATE = {"layerwise-accumulate": dict(feasible_set="layerwise"),
              "global-accumulate-separate": dict(feasible_set="global", target_strategy="separate"),
              "global-recompute-accumulate": dict(feasible_set="global", global_memory="recompute")}
ODD = {"odd-rows-layerwise": dict(feasible_set="layerwise"), "odd-rows-rowwise": dict(feasible_set="rowwise"),
       "odd-rows-global-separate": dict(feasible_set="global", target_strategy="separate")}
CHECKPOINTED = {"layerwise-merged-ckpt": (dict(feasible_set="layerwise"), False),
                "filter-separate-ckpt": (dict(feasible_set="filter", target_strategy="separate"), False),
                "global-merged-ckpt-reentrant": (dict(feasible_set="global"), True)}
LORA = {"lora-layerwise": dict(feasible_set="layerwise"), "lora-global-separate":
        dict(feasible_set="global", target_strategy="separate")}


def odd_lm():
    """A plain-PyTorch LM whose every parameter has an odd number of rows (uneven FSDP shards)."""
    torch.manual_seed(3)
    m = mt.TinyLM(vocab=129, dim=15, hidden=23)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return mt._finish(m, 3)


def model(lora: bool = False, odd: bool = False):
    if odd:
        return odd_lm()
    base = mt.llama(tied=True, num_layers=2, seed=1)     # tied embedding/lm_head, 2 decoder layers
    return mt.lora(base, ["q_proj", "v_proj", "down_proj"], seed=1) if lora else base


def decoder_layers(m):
    inner = m.base_model.model if hasattr(m, "base_model") and hasattr(m.base_model, "model") else m
    return inner.model.layers


def shard_model(m, mp_policy=None):
    if isinstance(m, mt.TinyLM):          # no decoder layers: the root alone
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        return fully_shard(m, mesh=init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),)))

    """fully_shard per decoder layer, then the root (as accelerate and torchtune do)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    kw = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(**mp_policy)}
    for layer in decoder_layers(m):
        fully_shard(layer, **kw)
    fully_shard(m, **kw)
    return m


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(kw, general, target, rank=0, world=1, micro=1, lora=False, mp_policy=None, dtype=None, halves=None,
        odd=False, reentrant=None):
    """STEPS AdamW steps; this process's masks, the (full) parameters, the first step's (full)
    gradients, the grads' types. ``halves``: the single-process reference of a 2-rank run with 2
    micro-batches per step (micro-batch j = every rank's j-th half shard)."""
    from drpost import DataRegularizer

    m = model(lora, odd)
    if dtype is not None:
        m = m.to(dtype)
    if reentrant is not None:       # HF activation checkpointing inside every FSDP unit
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if world > 1:
        shard_model(m, mp_policy)
    reg = DataRegularizer(m, frac=FRAC, **kw)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR * 0.1)
    masks, grad_types = [], set()
    for step in range(STEPS):
        g = general[step] if world == 1 else shard(general[step], rank, world)
        t = target[step] if world == 1 else shard(target[step], rank, world)
        opt.zero_grad(set_to_none=True)
        n = g["input_ids"].shape[0]
        parts = halves[step] if halves is not None else \
            [mt.slice_batch(g, slice(j * n // micro, (j + 1) * n // micro)) for j in range(micro)]
        for j, part in enumerate(parts):
            reg.backward(part, t, finalize=j == len(parts) - 1)
        if step == 0:
            first = {n: full(p.grad).clone() for n, p in m.named_parameters() if p.grad is not None}
        grad_types |= {type(p.grad).__name__ for p in m.parameters() if p.grad is not None}
        opt.step()
        masks.append({k: v.clone() for k, v in reg.last_masks.items()})
    return {"masks": masks, "grad_types": sorted(grad_types), "distributed": reg.distributed, "grads": first,
            "params": {n: full(p.detach()).clone() for n, p in m.named_parameters()}}


def halves_of(general):
    """Micro-batch j of a step = the concatenation of every rank's j-th half shard."""
    out = []
    for g in general:
        shards = [mt.slice_batch(g, slice(r * B, (r + 1) * B)) for r in range(WORLD)]
        out.append([mt.cat_batches(*[mt.slice_batch(s, slice(j * B // 2, (j + 1) * B // 2)) for s in shards])
                    for j in range(2)])
    return out


def hf_rows(n, seed, seq=12):
    b = mt.make_batch(n, seq, seed)
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def run_hf(out_dir: str, per_device: int, sharded: bool, resume=None, steps: int = 4):
    """DrPostTrainer, 4 steps, a checkpoint every 2; ``sharded``: the model is fully_shard-ed first."""
    from drpost.integrations import DrPostArguments, DrPostTrainer

    args = DrPostArguments(output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=per_device,
                           learning_rate=1e-2, max_steps=steps, logging_steps=1, save_strategy="steps",
                           save_steps=2, seed=0, disable_tqdm=True, dataloader_num_workers=0, target_batch_size=4,
                           frac=0.5, target_strategy="separate")
    args.world_size      # initialises the process group under torchrun
    m = model()
    if sharded:
        shard_model(m)
    t = DrPostTrainer(model=m, args=args, train_dataset=hf_rows(32, seed=11), target_dataset=hf_rows(16, seed=12))
    t.train(resume_from_checkpoint=resume)
    return {"params": {n: full(p.detach()).clone() for n, p in m.named_parameters()},
            "reduction": type(t.regularizer._reduction).__name__,
            "losses": [r["loss"] for r in t.state.log_history if "loss" in r]}


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
        part(name, lambda: run(kw, general, target, rank, world))
    for name, kw in ACCUMULATE.items():
        part(name, lambda: run(kw, general, target, rank, world, micro=2))
    for name, kw in LORA.items():
        part(name, lambda: run(kw, general, target, rank, world, lora=True))
    for name, (kw, reentrant) in CHECKPOINTED.items():
        part(name, lambda: run(kw, general, target, rank, world, reentrant=reentrant))
    for name, kw in ODD.items():
        part(name, lambda: run(kw, general, target, rank, world, odd=True))
    part("mixed-precision", lambda: run(dict(feasible_set="layerwise"), general, target, rank, world,
                                        mp_policy=dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                                        dtype=torch.float32))
    def hf():
        import shutil

        import torch.distributed as dist

        first = run_hf(str(out / "hf"), 4, sharded=True)
        if rank == 0:
            shutil.copytree(out / "hf" / "checkpoint-2", out / "hf-resumed" / "checkpoint-2")
        dist.barrier()
        resumed = run_hf(str(out / "hf-resumed"), 4, sharded=True, resume=True)
        return {"first": first, "resumed": resumed}

    part("hf", hf)
    part("greedy", lambda: {"raised": errors(lambda: DataRegularizer(shard_model(model()),
                                                                       feasible_set="greedy"))})

    def shared_across_units():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        m = model()
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(m.model.embed_tokens, mesh=mesh)       # the tied weight in its own unit, lm_head in the root
        fully_shard(m, mesh=mesh)
        reg = DataRegularizer(m, feasible_set="layerwise")
        return {"raised": errors(lambda: reg.backward(shard(general[0], rank, world), shard(target[0], rank, world)))}

    part("shared-across-units", shared_across_units)

    torch.save(res, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(_worker)


# ---------------------------------------------------------------------------------------------
# the tests (pytest process)

import pytest  # noqa: E402

from dist_launch import launch  # noqa: E402


@pytest.fixture(scope="module")
def data():
    general, target = global_batches()
    return {"general": general, "target": target}


@pytest.fixture(scope="module")
def ranks(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torch.save(data, out / "inputs.pt")
    return launch(__file__, out, TIMEOUT_S, WORLD)


part = part_of


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp2_two_ranks_equal_one_process(ranks, data, name):
    got = part(ranks, name)
    ref = run(CASES[name], data["general"], data["target"])
    assert got[0]["distributed"] and not ref["distributed"]
    assert_same_run(got, ref)
    if CASES[name]["feasible_set"] not in ("standard", "target_only"):
        assert "DTensor" in got[0]["grad_types"], got[0]["grad_types"]


@pytest.mark.parametrize("name", list(ACCUMULATE))
def test_fsdp2_gradient_accumulation(ranks, data, name):
    """2 micro-batches per rank and step: the same update as one process on the whole step."""
    got = part(ranks, name)
    ref = run(ACCUMULATE[name], data["general"], data["target"], halves=halves_of(data["general"]))
    assert_same_run(got, ref, masks_too=False)


@pytest.mark.parametrize("name", list(LORA))
def test_fsdp2_peft_lora(ranks, data, name):
    got = part(ranks, name)
    ref = run(LORA[name], data["general"], data["target"], lora=True)
    assert_same_run(got, ref)


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_fsdp2_with_activation_checkpointing_equals_one_process_without(ranks, data, name):
    got = part(ranks, name)
    ref = run(CHECKPOINTED[name][0], data["general"], data["target"])
    assert_same_run(got, ref)


@pytest.mark.parametrize("name", list(ODD))
def test_fsdp2_uneven_shards_root_only(ranks, data, name):
    """Parameters with an odd number of rows (FSDP pads the last shard), one unit (the root), a
    model that is not a Hugging Face one."""
    got = part(ranks, name)
    ref = run(ODD[name], data["general"], data["target"], odd=True)
    assert_same_run(got, ref)


def test_fsdp2_mixed_precision(ranks, data):
    """MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32): the sharded parameters and
    their gradients stay float32, the first step's gradient is the float32 one to bfloat16 accuracy,
    and training stays finite and identical on both ranks."""
    got = part(ranks, "mixed-precision")
    ref = run(dict(feasible_set="layerwise"), data["general"], data["target"], dtype=torch.float32)
    num = sum(float((got[0]["grads"][n] - g).norm() ** 2) for n, g in ref["grads"].items())
    den = sum(float(g.norm() ** 2) for g in ref["grads"].values())
    assert (num / den) ** 0.5 < 0.05, (num / den) ** 0.5
    for name, p in got[0]["params"].items():
        assert p.dtype == torch.float32 and got[0]["grads"][name].dtype == torch.float32, name
        assert torch.isfinite(p).all() and torch.equal(p, got[1]["params"][name]), name


def test_hf_trainer_on_a_sharded_model_equals_one_process_and_resumes_exactly(ranks, tmp_path):
    """DrPostTrainer given a fully_shard-ed model (2 ranks x 4 rows): the single-process run on 8 rows
    per step; checkpoints gather the full state on every rank, and a run resumed from step 2 ends
    exactly where the uninterrupted one does."""
    got = part(ranks, "hf")
    ref = run_hf(str(tmp_path / "ref"), 8, sharded=False)
    for g in got:
        assert g["first"]["reduction"] == "ShardedReduction"
        for name, p in ref["params"].items():
            torch.testing.assert_close(g["first"]["params"][name], p, rtol=1e-9, atol=1e-12)
            assert torch.equal(g["resumed"]["params"][name], g["first"]["params"][name]), name
    assert ranks[0]["hf"]["resumed"]["losses"][-2:] == ranks[0]["hf"]["first"]["losses"][-2:]


def test_greedy_refused_when_sharded(ranks):
    for r in part(ranks, "greedy"):
        assert r["raised"] and "greedy" in r["raised"] and "not supported with several processes" in r["raised"]


def test_parameter_shared_across_fsdp_units_refused(ranks):
    for r in part(ranks, "shared-across-units"):
        assert r["raised"] and "already managed by another FSDP group" in r["raised"], r


def test_fsdp1_refused_pointing_to_fsdp2():
    """FullyShardedDataParallel needs an accelerator to be built, so its refusal is checked on an
    instance made without its constructor (drpost looks only at the module types)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from drpost import DataRegularizer

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    wrapper._fsdp_wrapped_module = model()
    with pytest.raises(ValueError, match="FSDP1.*FlatParameter.*fully_shard"):
        DataRegularizer(wrapper, feasible_set="layerwise")
