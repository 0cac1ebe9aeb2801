"""CPU profile of a drpost step against a plain step on the same merged rows (general + target).

    python benchmarks/profile_merged_rows.py [--num-layers 6] [--scoring pairwise_ghost] [--steps 3]

A merged drpost step forwards and backpropagates B general rows plus the target rows; this script
runs a plain step (HF loss, ``loss.backward()``) on exactly those B + V rows and a drpost layerwise
step, each ``--steps`` times under ``torch.profiler`` after 2 warm-up steps, and prints the CPU
time per step of both and the aten ops whose self time differs most. It tells whether drpost's own
work (scoring, norm rules, bookkeeping) costs more or less than the weight gradient it saves; the
remaining distance to a plain step on the B general rows is the target rows themselves.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from drpost import DataRegularizer
    from drpost.bench import _batch
    from drpost.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--scoring", default="pairwise_ghost")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2", num_layers=args.num_layers)
    model.train()
    gen = torch.Generator().manual_seed(0)
    general = _batch(model.config.vocab_size, args.batch, args.seq, gen, "cpu")
    target = _batch(model.config.vocab_size, 1, args.seq, gen, "cpu")
    merged = {k: torch.cat([general[k], target[k]]) for k in ("input_ids", "attention_mask", "labels")}
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, scoring=args.scoring)
    reg.detach()

    def plain():
        model(**merged).loss.backward()
        model.zero_grad(set_to_none=True)

    def drpost():
        reg.backward(general, target)
        model.zero_grad(set_to_none=True)

    def cpu_ms(step) -> dict:
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        return {e.key: e.self_cpu_time_total / args.steps / 1e3 for e in prof.key_averages()}

    a = cpu_ms(plain)
    reg.attach()
    b = cpu_ms(drpost)
    reg.detach()
    rows = args.batch + 1
    print(f"SmolLM2 ({args.num_layers} layers), B={args.batch} + 1 target row, T={args.seq}, {args.threads} threads, "
          f"{args.steps} profiled steps each")
    print(f"CPU ms per step: plain on the {rows} merged rows {sum(a.values()):.0f}; drpost layerwise + "
          f"{args.scoring} {sum(b.values()):.0f}")
    keys = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, 0.0) - a.get(k, 0.0)))[:args.top]
    print(f"{'op':58s} {'plain':>9s} {'drpost':>9s} {'diff':>9s}")
    for k in keys:
        print(f"{k[:58]:58s} {a.get(k, 0.0):9.1f} {b.get(k, 0.0):9.1f} {b.get(k, 0.0) - a.get(k, 0.0):+9.1f}")


if __name__ == "__main__":
    main()
