"""Where a distributed drpost step's gradient reduction costs: the same layerwise step three ways.

    torchrun --standalone --nproc-per-node 2 benchmarks/probe_distributed_reduction.py MODE [--steps 5]

MODE is one of

- ``alone`` (drpost's default): a gradient of at least 1 MiB is all-reduced by itself, in place;
- ``packed``: every gradient packed into 25 MiB buckets (``torch.cat`` into a fresh buffer per
  bucket and step), as drpost did before 2026-12-04;
- ``none``: no gradient reduction at all (each rank keeps its own raw chosen gradients: the update
  is wrong, the timing is the step without the reduction's cost).

Each rank holds B=4 rows x T=128 of random tokens of the embedded SmolLM2-135M-Instruct and rank 0
one target row; rank 0 prints the median step time and the median exclusive time of the
``weight_grad`` and ``backward`` phases over ``--steps`` steps after one warm-up. Timing only: the
modes differ by patching drpost's reduction in this process, nothing here is a supported setting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    import torch
    import torch.distributed as dist

    from drpost import DataRegularizer
    from drpost.bench import _batch
    from drpost.engine import reduce as _reduce
    from drpost.models import load_model
    from drpost.profiling import PhaseTimer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("alone", "packed", "none"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--num-layers", type=int, default=None)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.mode == "packed":
        _reduce.DistributedReduction.alone_bytes = float("inf")
    elif args.mode == "none":
        def keep_own(self, pipeline, att):
            own = dict(pipeline.step.plain_acc)
            for g in att.groups:
                own.update(g.acc)
            return {p: own.get(p, torch.zeros_like(p)) for p in att.trainable}
        _reduce.DistributedReduction.on_assembled = lambda self, pipeline, group: None
        _reduce.DistributedReduction._reduce_gradients = keep_own
    model, _ = load_model("smollm2", num_layers=args.num_layers)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    vocab = model.config.vocab_size
    general = _batch(vocab, 4, 128, torch.Generator().manual_seed(1 + rank), "cpu")
    target = _batch(vocab, 1, 128, torch.Generator().manual_seed(99), "cpu")
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5)
    rows = []
    for step in range(1 + args.steps):
        timer = PhaseTimer()
        reg.profiler = timer
        dist.barrier()
        t0 = time.perf_counter()
        reg.backward(general, target if rank == 0 else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            rows.append((time.perf_counter() - t0, timer.seconds["weight_grad"], timer.seconds["backward"]))
    if rank == 0:
        med = [statistics.median(r[i] for r in rows) for i in range(3)]
        print(f"{args.mode}: median step {med[0]:.2f} s, weight_grad {med[1]:.3f} s, backward {med[2]:.3f} s "
              f"({args.steps} steps)", flush=True)
    reg.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
