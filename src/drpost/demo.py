"""`drpost demo`: a minimal end-to-end SFT run on a real model with real data.

Target task: write the headline of a BBC *tech* article (16 target examples, a disjoint
held-out test split). General pool: an imperfectly aligned mix (about 10 % headline examples
from the other BBC sections, section classification, ChatterBot Q&A, article continuation).

For each method the embedded SmolLM2-135M-Instruct is fine-tuned from the same starting point
on the same data order, through :class:`drpost.DataRegularizer`:

- ``standard``: the plain general-batch gradient (frac = 1, ordinary fine-tuning);
- ``layerwise``: every layer keeps the general samples whose gradients align best with the
  target gradient (top ``frac`` of the batch, chosen per layer);
- ``target_only``: train on the target examples alone (the over-fitting reference).

Reported: held-out target perplexity (token-mean cross-entropy on the assistant tokens)
before and after, seconds per step, and for selecting methods how often each kind of general
row was kept. Everything is written to ``<out>/demo-<timestamp>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from drpost.data import collate, headline_splits, tokenize_examples
from drpost.models import load_model

__all__ = ["DemoConfig", "run_demo", "add_demo_arguments", "config_from_args"]

METHODS = ("standard", "layerwise", "target_only")


@dataclass
class DemoConfig:
    steps: int = 30
    num_layers: int | None = None  # None = all 30 layers of SmolLM2-135M
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    out: str = "runs"
    model: str = "smollm2"
    lr: float = 5e-5
    batch_size: int = 8  # general rows per step
    target_rows: int = 2  # target rows per step (layerwise/standard)
    target_only_batch: int = 8  # rows per step for target_only (all from the target set)
    frac: float = 0.5  # layerwise keeps frac * batch_size samples per layer
    scoring: str = "auto"
    n_target: int = 16
    n_test: int = 50
    n_general: int = 1000
    max_length: int = 112
    eval_every: int = 10  # 0 = evaluate only before and after training
    eval_batch_size: int = 16
    autocast: bool = True  # bf16 autocast on CPU for the forward/backward passes
    system_prompt: str = ""  # "" = an empty system turn (shorter than SmolLM's default prompt)
    extra: dict = field(default_factory=dict)


def _autocast(model, enabled: bool):
    if not enabled:
        return nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16)


@torch.no_grad()
def perplexity(model, examples, pad_id, batch_size=16, autocast=True) -> float:
    """exp(token-mean cross-entropy over the supervised (assistant) tokens of ``examples``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with _autocast(model, autocast):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(ce)
        count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))


def _kept_by_kind(reg, kinds: list[str]) -> dict[str, float]:
    """Per kind of general row: the share of (layer, row) pairs the selection kept this step."""
    masks = [m for m in getattr(reg, "last_masks", {}).values() if m.dim() == 1 and m.numel() == len(kinds)]
    if not masks:
        return {}
    keep = torch.stack([m.float().cpu() for m in masks]).mean(0)  # [B]: share of layers keeping row i
    out = defaultdict(list)
    for kind, k in zip(kinds, keep.tolist()):
        out[kind].append(k)
    return {kind: sum(v) / len(v) for kind, v in out.items()}


def _train_one(method, cfg, data, ppl_before, pad_id) -> dict:
    """Fine-tune a fresh copy of the model with one method; returns its metrics."""
    from drpost import DataRegularizer

    torch.manual_seed(cfg.seed)
    model, _ = load_model(cfg.model, num_layers=cfg.num_layers)
    # The tied embedding / lm_head stays frozen in every method.
    model.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    frac = cfg.frac if method not in ("standard", "target_only") else 1.0
    reg = DataRegularizer(model, feasible_set=method, frac=frac, scoring=cfg.scoring)

    general, target, test = data["general"], data["target"], data["test"]
    order = torch.randperm(len(general), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    tgen = torch.Generator().manual_seed(cfg.seed + 1)
    target_order: list[int] = []
    curve = [{"step": 0, "test_ppl": ppl_before}]
    history, step_seconds = [], []
    kept = defaultdict(list)
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{method:>11}", unit="step", dynamic_ncols=True)
    for step in bar:
        rows = [order[((step - 1) * cfg.batch_size + j) % len(order)] for j in range(cfg.batch_size)]
        gen_rows = [general[r] for r in rows]
        if method == "target_only":
            n_t = cfg.target_only_batch  # reshuffled epochs over the target set
            while len(target_order) < n_t:
                target_order += torch.randperm(len(target), generator=tgen).tolist()
            t_idx, target_order = target_order[:n_t], target_order[n_t:]
        else:  # cycle through the target set in order, target_rows per step
            t_idx = [((step - 1) * cfg.target_rows + j) % len(target) for j in range(cfg.target_rows)]
        gb = collate(gen_rows, pad_id)
        tb = collate([target[i] for i in t_idx], pad_id)

        t0 = time.perf_counter()
        with _autocast(model, cfg.autocast):
            stats = reg.backward(gb, tb)
        skipped = bool(stats.skipped)
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t0)

        record = {"step": step, "seconds": step_seconds[-1], **stats.to_dict()}
        record.pop("selected", None)  # per-layer counts: too verbose for the metrics file
        for kind, share in _kept_by_kind(reg, [ex["kind"] for ex in gen_rows]).items():
            kept[kind].append(share)
        history.append(record)
        loss = record.get("target_loss") if method == "target_only" else record.get("general_loss")
        bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-", s_per_step=f"{step_seconds[-1]:.1f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            curve.append({"step": step, "test_ppl": perplexity(model, test, pad_id, cfg.eval_batch_size, cfg.autocast)})
    bar.close()
    reg.detach()
    ppl_after = perplexity(model, test, pad_id, cfg.eval_batch_size, cfg.autocast)
    curve.append({"step": cfg.steps, "test_ppl": ppl_after})
    return {
        "test_ppl_before": ppl_before,
        "test_ppl_after": ppl_after,
        "test_ppl_best": min(c["test_ppl"] for c in curve),
        "curve": curve,
        "seconds_per_step_median": statistics.median(step_seconds),
        "seconds_total_train": sum(step_seconds),
        "skipped_steps": sum(1 for h in history if h.get("skipped")),
        "kept_share_by_kind": {k: sum(v) / len(v) for k, v in sorted(kept.items())},
        "history": history,
    }


def _format_table(results: dict) -> str:
    lines = [
        f"{'method':<12} {'test ppl before':>15} {'after':>9} {'best':>9} {'s/step':>7}",
        "-" * 56,
    ]
    for method, r in results.items():
        lines.append(
            f"{method:<12} {r['test_ppl_before']:>15.2f} {r['test_ppl_after']:>9.2f} "
            f"{r['test_ppl_best']:>9.2f} {r['seconds_per_step_median']:>7.2f}"
        )
    kept = {m: r["kept_share_by_kind"] for m, r in results.items() if r["kept_share_by_kind"]}
    if kept:
        lines.append("")
        lines.append("share of (layer, row) pairs kept by the selection, per kind of general row (random = frac):")
        for method, shares in kept.items():
            lines.append(f"  {method:<10} " + "  ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    return "\n".join(lines)


def _run_dir(out: str) -> Path:
    base = Path(out) / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; print the comparison table; write and return the metrics."""
    unknown = [m for m in cfg.methods if m not in METHODS and m not in ("global", "random", "filter", "greedy", "rowwise")]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}")
    if cfg.steps < 1:
        raise ValueError("steps must be >= 1")
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    run_dir = _run_dir(cfg.out)

    splits = headline_splits(n_target=cfg.n_target, n_test=cfg.n_test, n_general=cfg.n_general, seed=cfg.seed)
    model, tok = load_model(cfg.model, num_layers=cfg.num_layers)
    pad_id = tok.pad_token_id
    data = {
        name: tokenize_examples(getattr(splits, name), tok, cfg.max_length, cfg.system_prompt)
        for name in ("target", "test", "general")
    }
    n_layers = model.config.num_hidden_layers
    print(
        f"drpost demo: {cfg.model} ({n_layers} layers), target = BBC tech headlines "
        f"({len(data['target'])} train / {len(data['test'])} test), general pool {len(data['general'])} "
        f"{splits.summary()['general_kinds']}, {cfg.steps} steps x {cfg.batch_size} general rows"
    )
    ppl_before = perplexity(model, data["test"], pad_id, cfg.eval_batch_size, cfg.autocast)
    print(f"base model test perplexity: {ppl_before:.2f}")
    del model

    results = {}
    for method in cfg.methods:
        results[method] = _train_one(method, cfg, data, ppl_before, pad_id)

    table = _format_table(results)
    print()
    print(table)
    metrics = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "model_layers": n_layers,
        "data": {**splits.summary(), "tokenized": {k: len(v) for k, v in data.items()}},
        "results": results,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "seconds_total": time.perf_counter() - t_start,
    }
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    (run_dir / "summary.txt").write_text(table + "\n")
    print(f"\nmetrics written to {path}  ({metrics['seconds_total']:.0f} s in total)")
    metrics["path"] = str(path)
    return metrics


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per method (default %(default)s)")
    p.add_argument(
        "--num-layers", type=int, default=d.num_layers,
        help="keep only the first N decoder layers of the model (default: all)",
    )
    p.add_argument(
        "--methods", default=",".join(d.methods),
        help="comma-separated feasible sets to compare (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="data split, order and init seed (default %(default)s)")
    p.add_argument("--out", default=d.out, help="parent directory of the run directory (default %(default)s)")
    p.add_argument("--model", default=d.model, help="'smollm2' (embedded) or a local HF model directory")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--frac", type=float, default=d.frac, help="share of the general batch each layer keeps")
    p.add_argument("--n-test", type=int, default=d.n_test, help="held-out tech articles for perplexity")
    p.add_argument("--n-general", type=int, default=d.n_general, help="size of the general pool")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps (0: only before/after)")
    p.add_argument(
        "--autocast", action=argparse.BooleanOptionalAction, default=d.autocast,
        help="bf16 autocast for forward/backward (default on)",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return DemoConfig(
        steps=args.steps, num_layers=args.num_layers, methods=methods, seed=args.seed, out=args.out,
        model=args.model, lr=args.lr, frac=args.frac, n_test=args.n_test, n_general=args.n_general,
        eval_every=args.eval_every, autocast=args.autocast,
    )
