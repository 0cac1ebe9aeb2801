"""Overhead of one ``reg.backward`` against a plain ``loss.backward`` on the same batch.

Plain and drpost steps alternate in one process so machine drift cancels; reported numbers are
medians over the repetitions and the ratio drpost/plain of those medians. Example:

    python benchmarks/overhead.py --batch 8 --seq 128 --target 1 --reps 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from drpost import DataRegularizer
from drpost.models import load_model


def make_batch(vocab: int, n: int, t: int, gen: torch.Generator) -> dict:
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    labels = ids.clone()
    labels[:, : t // 4] = -100          # a prompt without loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def plain_step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--target", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    ap.add_argument("--freeze-embeddings", action="store_true")
    ap.add_argument("--configs", default="layerwise:reduced_ghost,layerwise:pairwise_ghost,layerwise:direct,"
                    "layerwise:sketch,layerwise:auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tok = load_model(args.model, num_layers=args.num_layers)
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    general = make_batch(model.config.vocab_size, args.batch, args.seq, gen)
    target = make_batch(model.config.vocab_size, args.target, args.seq, gen)
    configs = [c.split(":") for c in args.configs.split(",")]
    regs = {}
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else torch.enable_grad

    def run_drpost(name):
        fset, scoring = name
        reg = DataRegularizer(model, feasible_set=fset, frac=0.5, scoring=scoring)
        model.zero_grad(set_to_none=True)
        with ctx():
            reg.backward(general, target)
        backends = dict(reg.layer_backends)
        reg.detach()
        return backends

    times = {"plain": []}
    times.update({":".join(c): [] for c in configs})
    backends = {}
    for rep in range(args.warmup + args.reps):
        order = [("plain", None)] + [(":".join(c), c) for c in configs]
        for key, cfg in order:
            t0 = time.perf_counter()
            if cfg is None:
                with ctx():
                    plain_step(model, general)
            else:
                backends[key] = run_drpost(cfg)
            dt = time.perf_counter() - t0
            if rep >= args.warmup:
                times[key].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k, v in med.items():
        used = {}
        for b in backends.get(k, {}).values():
            used[b] = used.get(b, 0) + 1
        rows.append({"config": k, "median_s": v, "ratio": v / med["plain"], "backends": used})
    print(f"\nmodel={args.model} layers={model.config.num_hidden_layers} B={args.batch} T={args.seq} "
          f"V={args.target} dtype={'bf16-autocast' if args.bf16 else 'fp32'} reps={args.reps} "
          f"threads={torch.get_num_threads()}")
    print("| config | median s | ratio vs plain | back-ends used (layers) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['median_s']:.3f} | {r['ratio']:.3f} | {r['backends'] or ''} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "times": times}, f, indent=2)


if __name__ == "__main__":
    main()
