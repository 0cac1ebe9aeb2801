"""Cost of drpost's collectives: a distributed drpost step against a plain DDP step, same ranks.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_distributed.py [--num-layers N] [--dtype bf16]

Every rank holds B rows of T tokens (random tokens, first quarter unsupervised) of the embedded
SmolLM2-135M-Instruct and, alternating in the same processes (so machine drift hits every variant
alike), times

- ``ddp``: ``DistributedDataParallel`` forward, ``loss.backward()`` (gradient all-reduce overlapped
  by DDP's reducer), AdamW step;
- ``ddp-nosync``: the same step under ``ddp_model.no_sync()`` (no gradient all-reduce): what DDP's
  own reduction costs on this machine, the calibration of drpost's distributed overhead;
- ``<feasible set>`` for each of ``--configs``: ``DataRegularizer(...).backward(...)`` on the
  unwrapped model (scores all-gathered per layer, each layer's chosen gradient all-reduced
  asynchronously as soon as it is final, bucketed like DDP), the
  merged target row on rank 0 (gathered to every rank), AdamW step;
- ``<feasible set>-local``: the same drpost step with ``distributed=False`` (each rank selects on its
  own rows, no collective at all, no gradient synchronisation): the difference to the row above is
  what the collectives cost.

Two model copies live on every rank (DDP's and drpost's), with the same initial weights. Rank 0
prints a Markdown table (median seconds, ratio to ``ddp``) and a breakdown of the distributed
steps (seconds blocked in each kind of collective, the rest computing) and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    import torch
    import torch.distributed as dist

    from drpost import DataRegularizer
    from drpost.bench import _batch
    from drpost.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=None, help="decoder layers kept (default: all 30)")
    ap.add_argument("--batch", type=int, default=4, help="general rows per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--configs", default="layerwise,global")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--breakdown-reps", type=int, default=1,
                    help="extra steps per drpost variant timed per phase on rank 0 (0: none)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance"))
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base, _ = load_model("smollm2", num_layers=args.num_layers)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ddp_model = torch.nn.parallel.DistributedDataParallel(base)
    reg_model, _ = load_model("smollm2", num_layers=args.num_layers)
    reg_model.load_state_dict(state)
    for m in (base, reg_model):
        m.train()
    opt_ddp = torch.optim.AdamW(base.parameters(), lr=1e-7)
    opt_reg = torch.optim.AdamW(reg_model.parameters(), lr=1e-7)
    gen = torch.Generator().manual_seed(1 + rank)
    vocab = base.config.vocab_size
    general = _batch(vocab, args.batch, args.seq, gen, "cpu")
    target = _batch(vocab, 1, args.seq, torch.Generator().manual_seed(99), "cpu")
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext

    # where a distributed step's time goes: seconds this rank is blocked in each kind of collective
    # (score / target-row all-gathers, the metadata all-reduce, launching the gradient all-reduces,
    # waiting for them at finalize), summed per step
    from drpost import distributed as _dist
    blocked: dict = {}
    run = _dist.DistContext._run

    def timed_run(self, what, start):
        t = time.perf_counter()
        try:
            return run(self, what, start)
        finally:
            blocked[what] = blocked.get(what, 0.0) + time.perf_counter() - t
    _dist.DistContext._run = timed_run

    regs = {}
    for fset in [c for c in args.configs.split(",") if c]:
        for local in (False, True):
            reg = DataRegularizer(reg_model, feasible_set=fset, frac=0.5, distributed=False if local else None)
            reg.detach()
            regs[fset + ("-local" if local else "")] = reg

    def ddp_step(sync: bool = True):
        with amp(), (nullcontext() if sync else ddp_model.no_sync()):
            loss = ddp_model(input_ids=general["input_ids"], attention_mask=general["attention_mask"],
                             labels=general["labels"]).loss
            loss.backward()
        opt_ddp.step()
        opt_ddp.zero_grad(set_to_none=True)

    def reg_step(key):
        reg = regs[key]
        reg.attach()
        try:
            with amp():
                local = key.endswith("-local")
                reg.backward(general, target if (rank == 0 or local) else None)
            opt_reg.step()
            opt_reg.zero_grad(set_to_none=True)
        finally:
            reg.detach()

    keys = ["ddp", "ddp-nosync", *regs]
    times = {k: [] for k in keys}
    waits = {k: [] for k in keys if not k.startswith("ddp") and not k.endswith("-local")}
    for rep in range(args.warmup + args.reps):
        for key in keys:
            dist.barrier()
            blocked.clear()
            t0 = time.perf_counter()
            ddp_step(key == "ddp") if key.startswith("ddp") else reg_step(key)
            t1 = time.perf_counter()
            dist.barrier()
            if rep >= args.warmup:
                times[key].append(time.perf_counter() - t0)
                if key in waits:
                    waits[key].append(dict(blocked, step=t1 - t0))
    # where the drpost steps' time goes, per phase (exclusive seconds; "other" = outside every phase)
    from drpost.profiling import PhaseTimer
    phases: dict = {}
    for key in regs if args.breakdown_reps else ():
        timer = PhaseTimer()
        regs[key].profiler = timer
        for _ in range(args.breakdown_reps):
            dist.barrier()
            with timer.phase("other"):
                reg_step(key)
        regs[key].profiler = None
        phases[key] = {k: v / args.breakdown_reps for k, v in timer.seconds.items()}
    if rank == 0:
        base_t = statistics.median(times["ddp"])
        rows = [{"variant": k, "median_s": statistics.median(v), "ratio": statistics.median(v) / base_t,
                 "min_max": [min(v) / base_t, max(v) / base_t]} for k, v in times.items()]
        layers = base.config.num_hidden_layers
        head = (f"SmolLM2-135M-Instruct ({layers} layers, full FT), {world} CPU processes (gloo, "
                f"{torch.get_num_threads()} thread each), B={args.batch} rows x T={args.seq} per rank, V=1 target "
                f"row, {args.dtype}, {args.reps} timed reps after {args.warmup} warm-up, variants alternated")
        lines = [head, "", "| variant | median s | ratio to DDP step (min-max) |", "|---|---|---|"]
        lines += [f"| {r['variant']} | {r['median_s']:.3f} | {r['ratio']:.3f} ({r['min_max'][0]:.2f}-"
                  f"{r['min_max'][1]:.2f}) |" for r in rows]
        lines += ["", "Where the distributed steps' time goes (rank 0, median seconds per step): blocked in the "
                  "all-gathers (scores, target rows), the metadata all-reduce, launching the gradient all-reduces, "
                  "waiting for them at finalize; the rest is computation (and contention with gloo's threads).", "",
                  "| variant | step | all-gather | metadata all-reduce | gradient launch | gradient wait | rest | "
                  "local step | ddp step |", "|---|---|---|---|---|---|---|---|---|"]
        local_t = {k: statistics.median(times[k + "-local"]) for k in waits if k + "-local" in times}
        for key, reps in waits.items():
            med = {w: statistics.median(r.get(w, 0.0) for r in reps) for w in
                   ("step", "all-gather", "all-reduce", "gradient all-reduce (launch)", "gradient all-reduce")}
            rest = statistics.median(r["step"] - sum(v for k, v in r.items() if k != "step") for r in reps)
            lines.append(f"| {key} | {med['step']:.3f} | {med['all-gather']:.3f} | {med['all-reduce']:.3f} | "
                         f"{med['gradient all-reduce (launch)']:.3f} | {med['gradient all-reduce']:.3f} | {rest:.3f} "
                         f"| {local_t.get(key, float('nan')):.3f} | {base_t:.3f} |")
        plain = statistics.median(times["ddp-nosync"])
        lines += ["", f"Calibration: the plain step without its gradient all-reduce (`ddp-nosync`, DDP under "
                  f"`no_sync()`) takes {plain:.3f} s, so DDP's own all-reduce costs {base_t - plain:.3f} s per step "
                  "beyond it; against that step, drpost's distributed overhead is: " + ", ".join(
                      f"{k} {statistics.median(times[k]) - statistics.median(times[k + '-local']):.3f} s over its local "
                      "step" for k in waits if k + "-local" in times) + "."]
        if phases:
            names = sorted({n for v in phases.values() for n in v}, key=lambda n: (n == "other", n))
            lines += ["", f"Breakdown of the drpost steps on rank 0 ({args.breakdown_reps} extra step(s) each, "
                      "exclusive seconds per phase; `backward` is autograd's own work, `other` the step outside "
                      "every phase: finalize, collectives' waits, the optimizer):", "",
                      "| variant | " + " | ".join(names) + " | sum |", "|---|" + "---|" * (len(names) + 1)]
            lines += [f"| {k} | " + " | ".join(f"{v.get(n, 0.0):.3f}" for n in names) + f" | {sum(v.values()):.3f} |"
                      for k, v in phases.items()]
        text = "\n".join(lines)
        print(text, flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"distributed-R{world}-B{args.batch}-T{args.seq}-{args.dtype}"
        (out / f"{stem}.md").write_text(text + "\n")
        (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "world": world, "rows": rows,
                                                      "times": times, "blocked": waits, "phases_s": phases},
                                                     indent=1))
    for reg in regs.values():
        reg.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
