"""What sharing the input-side products saves: the scoring of one SmolLM2-135M decoder layer's
q/k/v and gate/up (they read two tensors), each layer's input Gram (``pairwise_ghost``) or input
sketch (``sketch`` 64 x 64) computed once per input tensor against once per layer.

    python benchmarks/bench_shared_inputs.py [--batch 8] [--seq 128] [--threads 2] [--reps 15]

Random factors of the real widths (B general rows + 1 target row of T tokens, fp32); each variant
is timed in process CPU time, ``--reps`` times after 2 warm-ups, the variants alternated, medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from drpost.layers import Factors  # noqa: E402
from drpost.layers.input_products import INPUT_PRODUCTS  # noqa: E402
from drpost.layers.linear import LinearRule  # noqa: E402
from drpost.scoring.sketch import LayerSketch  # noqa: E402

HIDDEN = 576
READERS = {"q/k/v": (576, 192, 192), "gate/up": (1536, 1536)}   # output widths of the layers fed one input


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t = args.batch, args.seq
    layers = []   # (rule, general factors, target factors, sketch) per reader
    for i, (name, outs) in enumerate(READERS.items()):
        x, xt = torch.randn(b, t, HIDDEN), torch.randn(1, t, HIDDEN)
        for j, o in enumerate(outs):
            sk = LayerSketch("gaussian", 64, 64, o, HIDDEN, True, False, seed=100 * i + j, device="cpu",
                             right_seed=i)
            layers.append((LinearRule(torch.nn.Linear(HIDDEN, o, bias=False)),
                           Factors(x, torch.randn(b, t, o)), Factors(xt, torch.randn(1, t, o)), sk))

    def pairwise():
        for rule, g, tg, _ in layers:
            rule.pairwise_scores(g, tg, False)

    def sketch():
        for rule, g, tg, sk in layers:
            (rule.sketch(g, sk, False) * rule.sketch(tg, sk, False).sum(0)).sum(-1)

    def seconds(fn, shared: bool) -> float:
        with torch.no_grad():
            if shared:
                t0 = time.process_time()
                fn()
                INPUT_PRODUCTS.clear()
                return time.process_time() - t0
            with INPUT_PRODUCTS.disabled():
                t0 = time.process_time()
                fn()
                return time.process_time() - t0

    print(f"one decoder layer's q/k/v + gate/up scoring, B={b} T={t} + 1 target row, fp32, "
          f"{args.threads} threads, CPU time, median of {args.reps}\n")
    print("| back-end | each layer its own input product (ms) | shared per input tensor (ms) | ratio |")
    print("|---|---|---|---|")
    for label, fn in (("pairwise_ghost (input Gram)", pairwise), ("sketch 64x64 (input sketch)", sketch)):
        runs = {False: [], True: []}
        for rep in range(args.reps + 2):
            for shared in (False, True):
                s = seconds(fn, shared)
                if rep >= 2:
                    runs[shared].append(s)
        own, shared = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"| {label} | {own * 1e3:.1f} | {shared * 1e3:.1f} | {shared / own:.3f} |")


if __name__ == "__main__":
    main()
