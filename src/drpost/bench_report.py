"""The report of ``drpost bench`` (:mod:`drpost.bench`): a Markdown table of the ratios to the plain step,
the breakdown per phase, and the JSON of every number."""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import bench_stats

PHASES = ("forward", "backward", "activation_backward", "weight_grad", "scoring", "selection", "norm_rules",
          "assembly", "optimizer", "pass_1", "pass_2", "per_sample_grads", "other")


def format_report(report: dict) -> str:
    """Markdown: the ratio table, then the breakdown table (ms per phase)."""
    c = report["config"]
    head = (f"model {c['model']} ({report['model_layers']} layers, {report['trainable_params'] / 1e6:.1f}M trainable), "
            f"B={c['batch']} T={c['seq']} V={c['target']}, {c['dtype']}"
            + (" (no native bf16 GEMM here: generic kernels)" if c["dtype"] == "bf16"
               and report["machine"].get("native_bf16") is False else "")
            + f", {c['device']} "
            f"({report['machine']['threads']} threads), frac {c['frac']}, target {c.get('target_strategy', 'merged')}"
            + (f" (refresh every {c['refresh_every']})" if c.get("target_strategy") == "separate" else "")
            + (", activation checkpointing (non-reentrant)" if c.get("gradient_checkpointing") else "")
            + f", {c['reps']} timed reps after "
            f"{c['warmup']} warm-up, variants alternated; memory = {report['memory_kind']}")
    lines = [head, "", "| variant | median s | ratio to plain (min-max) | pair ratio, wall: median [IQR] | "
             "pair ratio, CPU time: median [IQR] | peak MB | memory ratio | back-ends (layers) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "failed" in r:
            lines.append(f"| {r['config']} | failed: {r['failed']} | | | | | | |")
            continue
        lo, hi = r["ratio_min_max"]
        used = ", ".join(f"{k} {v}" for k, v in sorted(r["backends"].items()))
        lines.append(f"| {r['config']} | {r['median_s']:.3f} | {r['ratio']:.3f} ({lo:.2f}-{hi:.2f}) | "
                     f"{_iqr(r.get('pair_ratio'))} | {_iqr(r.get('cpu_pair_ratio'))} | "
                     f"{r['peak_mb']:.0f} | {r['memory_ratio']:.3f} | {used} |")
    lines += _ranking_lines(report)
    cycles = [(r["config"], r["cycle_ratio"]) for r in report["rows"] if r.get("cycle_ratio") and r["config"] != "plain"]
    if cycles:
        n, every = cycles[0][1]["steps"], cycles[0][1]["refresh_every"]
        passes = {r["config"]: r.get("target_passes") for r in report["rows"]}
        lines += ["", f"Amortised over whole refresh cycles (the first {n} timed steps, one target refresh in "
                  f"every {every}): summed time over the plain steps' — "
                  + "; ".join(f"{k}: CPU time {v['cpu']:.3f}, wall {v['wall']:.3f}" for k, v in cycles) + ".",
                  "", "Target passes in the timed steps: " + "; ".join(
                      f"{k} {passes[k]} of {len(report['times'][k])}" for k, _ in cycles) + "."]
    why = [(r["config"], g) for r in report["rows"] if ":auto" in r["config"] or r["config"].endswith("auto")
           for g in r.get("backend_reasons") or []]
    if why:
        lines += ["", "Why `auto` chose each back-end (layers grouped by choice and reason):", ""]
        lines += [f"- {cfg}: {g['backend']} for {g['layers']} layer(s), e.g. `{g['example']}`: {g['reason']}"
                  for cfg, g in why]
    phases = [p for p in PHASES if any(p in r.get("breakdown_s", {}) for r in report["rows"])]
    if phases:
        lines += ["", "Breakdown (ms per step; exclusive time per phase):", "",
                  "| variant | " + " | ".join(phases) + " | sum |", "|---|" + "---|" * (len(phases) + 1)]
        for r in report["rows"]:
            bd = r.get("breakdown_s") or {}
            if not bd:
                continue
            cells = ["" if p not in bd else f"{bd[p] * 1e3:.0f}" for p in phases]
            lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {sum(bd.values()) * 1e3:.0f} |")
    lines += _by_layer_type_lines(report)
    return "\n".join(lines)


def _by_layer_type_lines(report: dict) -> list[str]:
    """Scoring and chosen-gradient time per layer type (summed over the model's layers of that type)."""
    rows = [r for r in report["rows"] if r.get("breakdown_by_layer_type_s")]
    if not rows:
        return []
    kinds = sorted({k for r in rows for ph in r["breakdown_by_layer_type_s"].values() for k in ph})
    lines = ["", "By layer type (ms per step, summed over the layers of that type; scoring / weight_grad):", "",
             "| layer type | " + " | ".join(r["config"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for k in kinds:
        cells = []
        for r in rows:
            bk = r["breakdown_by_layer_type_s"]
            sc, wg = bk.get("scoring", {}).get(k), bk.get("weight_grad", {}).get(k)
            cells.append(" / ".join("" if v is None else f"{v * 1e3:.0f}" for v in (sc, wg)))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _iqr(s: dict | None) -> str:
    if not s or not s.get("n"):
        return ""
    mark = " (noisy)" if bench_stats.too_noisy(s) else ""
    return f"{s['median']:.3f} [{s['q1']:.3f}-{s['q3']:.3f}]{mark}"


def _ranking_lines(report: dict) -> list[str]:
    """Which variants the run can rank (disjoint IQRs of the pair ratios) and which it cannot."""
    ranking = report.get("ranking")
    if not ranking:
        return []
    by = "CPU-time" if ranking["by"] == "cpu_pair_ratio" else "wall-time"
    lines = [""]
    if ranking["ranked"]:
        lines.append(f"Ranked by {by} pair ratio (IQRs disjoint): "
                     + "; ".join(f"{a} < {b}" for a, b in ranking["ranked"]) + ".")
    if ranking["unrankable"]:
        lines.append(f"Spread too large to rank (IQRs of the {by} pair ratios overlap): "
                     + "; ".join(f"{a} ~ {b}" for a, b in ranking["unrankable"]) + ".")
    if ranking["by"] == "cpu_pair_ratio" and str(report.get("omp_wait_policy") or "").upper() != "PASSIVE":
        lines.append("OMP_WAIT_POLICY is not PASSIVE: idle OpenMP threads spin and count as CPU time, so the CPU-time "
                     "ratios include waiting; rerun as `OMP_WAIT_POLICY=PASSIVE drpost bench ...` (./run.sh bench sets it).")
    return lines


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = report["config"]
    stem = f"bench-B{c['batch']}-T{c['seq']}-V{c['target']}-{c['dtype']}-{c['device'].replace(':', '')}"
    if c.get("target_strategy") == "separate":
        stem += f"-separate{c['refresh_every']}"
    if c.get("gradient_checkpointing"):
        stem += "-ckpt"
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(format_report(report) + "\n")
    js.write_text(json.dumps(report, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    return md, js
