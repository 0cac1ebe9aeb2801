"""What skipping the lm_head's zero output-gradient rows saves, per phase, on the real model.

    python benchmarks/bench_zero_rows.py [--config layerwise:pairwise_ghost] [--strategy merged]
                                         [--reps 3] [--threads 2]

SmolLM2-135M-Instruct, all 30 layers, the bench's batch (B 8 rows + 1 target row, T 128, the first
quarter of every row unsupervised, fp32). One DataRegularizer; its steps alternate between the
Linear rule's zero-row search on (``LinearRule.support_min_width`` 8192: the tied lm_head, 49152
wide, searches) and off (a width no layer reaches), each timed per phase with
:class:`drpost.profiling.PhaseTimer` (wall ms, exclusive), medians over ``--reps`` steps of each.
With ``--strategy separate`` the target is captured at every step (``refresh_every`` 1), so each
step pays the same.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from drpost.bench import BenchConfig, _Bench  # noqa: E402
from drpost.layers import LinearRule  # noqa: E402
from drpost.profiling import PhaseTimer  # noqa: E402

SETTINGS = {"search on": LinearRule.support_min_width, "search off": 10 ** 12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="layerwise:pairwise_ghost")
    ap.add_argument("--strategy", default="merged", choices=["merged", "separate"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(seq=128, dtype="fp32", configs=[args.config], threads=args.threads,
                      target_strategy=args.strategy, refresh_every=1)
    bench = _Bench(cfg)
    bench.activate(args.config)
    bench.drpost(args.config)                          # warm-up (and auto's calibration)
    runs: dict = {name: [] for name in SETTINGS}
    for _ in range(args.reps):
        for name, width in SETTINGS.items():
            LinearRule.support_min_width = width
            timer = PhaseTimer()
            with timer.phase("other"):
                bench.drpost(args.config, timer)
            runs[name].append({**{k: v * 1000 for k, v in timer.seconds.items()},
                               "tied scoring": timer.by_kind["scoring"].get("tied", 0.0) * 1000,
                               "tied weight_grad": timer.by_kind["weight_grad"].get("tied", 0.0) * 1000,
                               "step": sum(timer.seconds.values()) * 1000})
    LinearRule.support_min_width = SETTINGS["search on"]
    keys = ["step", "forward", "backward", "scoring", "weight_grad", "tied scoring", "tied weight_grad"]
    print(f"{args.config}, {args.strategy} target, {args.reps} steps per setting, alternated; wall ms, medians")
    print("| setting | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, steps in runs.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(s.get(k, 0.0) for s in steps):.0f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
