"""Cost and saving of activation checkpointing, plain training and drpost, on the embedded SmolLM2.

    python benchmarks/bench_checkpointing.py [--num-layers N] [--seq 512] [--batch 2] [--target 1]

Variants {plain, drpost layerwise} x {checkpointing off, on (Hugging Face, use_reentrant=False)},
each in a fresh Python process (on CPU the allocator keeps freed pages, so peaks of several variants
cannot be told apart in one process). In its process a variant

1. runs one warm-up step (AdamW state allocated), resets the kernel's peak-RSS counter (VmHWM; on
   CUDA the allocator's peak) and runs one measured step: ``peak`` is that step's peak, ``step``
   the peak minus the memory held just before it (weights, gradients' buffers, optimizer state:
   what the step itself adds, the activations mostly);
2. alternates ``--reps`` timed steps of itself with the same number of the reference step (plain,
   checkpointing off, switched off and on again in the same process between steps), so machine
   drift and the other processes on a shared machine hit both alike: ``time ratio`` is the median
   of the variant over the median of the reference.

Rows are B general rows of exactly T tokens (random tokens, the first quarter an unsupervised
prompt), drpost adds ``--target`` target rows (merged strategy). fp32, full fine-tuning with the
embedding (and the tied lm_head) frozen, AdamW with a tiny learning rate. Prints a Markdown table
and writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = [("plain", False), ("plain", True), ("layerwise", False), ("layerwise", True)]


def _child(args) -> dict:
    import torch
    import transformers

    from drpost import DataRegularizer
    from drpost.bench import _batch
    from drpost.bench_memory import PeakCUDA, proc_status_kb, reset_peak_rss
    from drpost.models import load_model

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, _ = load_model("smollm2", num_layers=args.num_layers)
    model = model.to(device).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-7)
    gen = torch.Generator().manual_seed(0)
    general = _batch(model.config.vocab_size, args.batch, args.seq, gen, device)
    target = _batch(model.config.vocab_size, args.target, args.seq, gen, device)
    method, ckpt = args.child, bool(args.ckpt)
    reg = DataRegularizer(model, feasible_set=method, frac=0.5) if method != "plain" else None

    def checkpointing(on: bool):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif model.is_activation_checkpointing:
            model.gradient_checkpointing_disable()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain_step():
        loss = model(input_ids=general["input_ids"], attention_mask=general["attention_mask"],
                     labels=general["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def variant_step():
        if reg is None:
            plain_step()
            return
        reg.backward(general, target)
        opt.step()
        opt.zero_grad(set_to_none=True)

    checkpointing(ckpt)
    variant_step()                       # warm-up
    import gc
    gc.collect()
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        with PeakCUDA(device) as pk:
            variant_step()
        peak = pk.peak
    else:
        before = proc_status_kb("VmRSS") * 1024
        if not reset_peak_rss():
            raise SystemExit("cannot reset the peak-RSS counter (/proc/self/clear_refs): Linux only")
        variant_step()
        peak = proc_status_kb("VmHWM") * 1024

    def timed(fn, on):
        if reg is not None:
            reg.detach() if fn is plain_step else reg.attach()
        checkpointing(on)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    ref, own = [], []
    timed(plain_step, False)            # reference warm-up
    for _ in range(args.reps):
        ref.append(timed(plain_step, False))
        own.append(timed(variant_step, ckpt))
    return {"method": method, "checkpointing": ckpt, "peak_bytes": peak, "before_bytes": before,
            "step_bytes": peak - before, "seconds": own, "reference_seconds": ref,
            "time_ratio": statistics.median(own) / statistics.median(ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=None, help="decoder layers kept (default: all 30)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="general rows")
    ap.add_argument("--target", type=int, default=1, help="target rows (drpost)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance" / "checkpointing.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    rows = []
    for method, ckpt in VARIANTS:
        cmd = [sys.executable, __file__, "--child", method, "--ckpt", str(int(ckpt))] + \
              [a for a in sys.argv[1:] if a not in ("--child", "--ckpt")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} checkpointing={ckpt} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {method} checkpointing={ckpt}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    mb = 2 ** 20
    base = {r["method"]: r for r in rows if not r["checkpointing"]}
    lines = [f"SmolLM2-135M-Instruct ({args.num_layers or 30} decoder layers), T={args.seq}, B={args.batch} general"
             f" (+{args.target} target for drpost), fp32, {args.device}",
             "", "| variant | checkpointing | peak MiB | step MiB | step MiB vs off | time / plain-off (median) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        rel = r["step_bytes"] / base[r["method"]]["step_bytes"]
        lines.append(f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_bytes'] / mb:.0f} | "
                     f"{r['step_bytes'] / mb:.0f} | {rel:.2f} | {r['time_ratio']:.2f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
