"""Per-rank peak memory of a training step: FSDP2 (``fully_shard``) against replicated data parallelism.

    python benchmarks/bench_fsdp_memory.py [--num-layers N] [--batch 4] [--seq 128]

Every variant runs in a fresh ``torchrun --nproc-per-node 2`` launch (gloo, 1 thread per rank) on the
embedded SmolLM2-135M-Instruct, fp32, full fine-tuning, AdamW, B rows x T tokens per rank and one
target row (rank 0's, gathered by drpost):

- ``ddp``: ``DistributedDataParallel`` forward + ``loss.backward()`` + AdamW (the stock replicated step);
- ``drpost``: ``DataRegularizer(layerwise)`` on the unwrapped replicated model (drpost all-reduces);
- ``fsdp2``: the stock FSDP2 step (``fully_shard`` per decoder layer, then the root);
- ``fsdp2-drpost`` (and ``fsdp2-drpost-global``): ``DataRegularizer`` on the same sharded model.

Each rank reports the RSS after building the model and optimizer, and the peak RSS (sampled every
millisecond by ``drpost.bench_memory.PeakRSS``) over 2 measured steps after 1 warm-up step (so the
optimizer state exists). Rank 0 of the driver prints a Markdown table and writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
VARIANTS = ("ddp", "drpost", "fsdp2", "fsdp2-drpost", "fsdp2-drpost-global")
MB = 2 ** 20


def worker(variant: str, args) -> None:
    import torch
    import torch.distributed as dist

    from drpost import DataRegularizer
    from drpost.bench import _batch
    from drpost.bench_memory import PeakRSS
    from drpost.models import load_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model, _ = load_model("smollm2", num_layers=args.num_layers)
    model.train()
    if variant.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    stock = variant in ("ddp", "fsdp2")
    net = torch.nn.parallel.DistributedDataParallel(model) if variant == "ddp" else model
    reg = None if stock else DataRegularizer(model, feasible_set="global" if variant.endswith("global") else
                                             "layerwise", frac=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    gen = torch.Generator().manual_seed(1 + rank)
    general = _batch(model.config.vocab_size, args.batch, args.seq, gen, "cpu")
    target = _batch(model.config.vocab_size, 1, args.seq, torch.Generator().manual_seed(99), "cpu")

    def step():
        if stock:
            net(**general).loss.backward()
        else:
            reg.backward(general, target if rank == 0 else None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dist.barrier()
    meter = PeakRSS()
    base = meter._rss()
    step()
    dist.barrier()
    with meter:
        for _ in range(2):
            step()
    res = [None] * dist.get_world_size()
    dist.all_gather_object(res, {"rank": rank, "after_build_mb": base / MB, "peak_mb": meter.peak / MB})
    if rank == 0:
        Path(args.out_json).write_text(json.dumps(res))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=None, help="decoder layers kept (default: all 30)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance" / "fsdp_memory.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    rows = {}
    for variant in args.variants.split(","):
        out = Path(args.out).with_suffix(f".{variant}.tmp.json")
        cmd = [torchrun, "--standalone", "--nproc-per-node", "2", __file__, "--worker", variant,
               "--out-json", str(out), "--batch", str(args.batch), "--seq", str(args.seq)]
        if args.num_layers:
            cmd += ["--num-layers", str(args.num_layers)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows[variant] = json.loads(out.read_text())
        out.unlink()
    ref = max(r["peak_mb"] for r in rows.get("ddp", next(iter(rows.values()))))
    layers = args.num_layers or 30
    print(f"SmolLM2-135M-Instruct ({layers} layers, full FT, fp32), 2 CPU ranks (gloo), B={args.batch} x "
          f"T={args.seq} per rank, 1 target row, AdamW; per-rank RSS, fresh launch per variant\n")
    print("| variant | after build MB (rank 0 / 1) | step peak MB (rank 0 / 1) | peak / DDP peak |")
    print("|---|---|---|---|")
    for variant, res in rows.items():
        built = " / ".join(f"{r['after_build_mb']:.0f}" for r in res)
        peak = " / ".join(f"{r['peak_mb']:.0f}" for r in res)
        print(f"| {variant} | {built} | {peak} | {max(r['peak_mb'] for r in res) / ref:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
