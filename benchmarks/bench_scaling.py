"""Ratio drpost step / plain step against the sequence length T and the number of target rows V.

    .venv/bin/python benchmarks/bench_scaling.py [--dtype bf16] [--configs layerwise:auto,layerwise:sketch]

Each point is one ``drpost bench`` run (plain and drpost steps alternated, medians of ``--reps``)
without the naive alternatives or the breakdown; the T sweep holds V = 1, the V sweep holds
T = 128. Writes ``docs/performance/scaling-<dtype>.png`` and ``.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    from drpost.bench import BenchConfig, run_bench
    from drpost.plots import _pyplot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default="layerwise:auto,layerwise:sketch,global:auto")
    ap.add_argument("--seqs", default="64,128,256,512")
    ap.add_argument("--targets", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance"))
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    points = [("T", int(t), 1, int(t)) for t in args.seqs.split(",")]
    points += [("V", 128, int(v), int(v)) for v in args.targets.split(",")]
    results = []
    for axis, seq, target, x in points:
        cfg = BenchConfig(batch=args.batch, seq=seq, target=target, dtype=args.dtype, device=args.device,
                          reps=args.reps, warmup=1, breakdown_reps=0, configs=configs, naive=False,
                          memory="off")
        report = run_bench(cfg, progress=False)
        row = {"axis": axis, "x": x, "seq": seq, "target": target,
               "ratios": {r["config"]: r["ratio"] for r in report["rows"] if "ratio" in r},
               "plain_s": next(r["median_s"] for r in report["rows"] if r["config"] == "plain")}
        results.append(row)
        print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scaling-{args.dtype}-{args.device.replace(':', '')}"
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "points": results}, indent=1))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, axis, label in ((axes[0], "T", "sequence length T (B=%d, V=1)" % args.batch),
                            (axes[1], "V", "target rows V (B=%d, T=128)" % args.batch)):
        pts = [r for r in results if r["axis"] == axis]
        for c in configs:
            ax.plot([r["x"] for r in pts], [r["ratios"].get(c) for r in pts], marker="o", label=c)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("step time / plain step (median)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"drpost step vs plain step, SmolLM2-135M-Instruct full fine-tuning, {args.dtype}, {args.device}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"wrote {out / stem}.png/.json")


if __name__ == "__main__":
    main()
