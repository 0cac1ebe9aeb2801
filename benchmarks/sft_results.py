"""Regenerate ``docs/results.md``: the evidence grid (issue 14) — does data regularization beat standard
training and data selection on the target metric?

    ./run.sh --help >/dev/null                             # once: creates .venv with everything installed
    .venv/bin/python benchmarks/sft_results.py --jobs 2    # the whole grid, ~3.5 h on this 2-core CPU
    .venv/bin/python benchmarks/sft_results.py --tables-only   # re-write the docs from the finished runs

Four ``drpost spectrum`` grids (:data:`SPECTRA`, in priority order) under ``results/sft/``, each run with
``--resume``: finished runs are kept, so an interrupted call continues where it stopped, and a fresh
clone continues from the runs committed in ``results/`` (``--commit`` commits every run as it
finishes). ``--jobs 2`` runs two spectra side by side, one thread each (an 8-step probe: 5.9 s/step
on 1 thread vs 4.3 on 2, so ~1.45x the throughput of one 2-thread run). The docs are written from whatever has finished: each table says
how many of its runs are in.

Then it copies each spectrum's ``summary.md``, plots and CSVs to ``docs/results/<name>/`` and replaces
the generated blocks of ``docs/results.md`` (between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->``);
the prose around them is written by hand from those numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from commit_results import commit_results  # noqa: E402

OUT = "results/sft"   # relative to the repository root: the runs' recorded paths stay valid in any clone

ALL_METHODS = "standard,layerwise,global,greedy,offline,random,target_only"
# name -> (recipe, overrides). Sizes, chosen to fit ~3.5 h of this 2-core CPU (see docs/results.md):
# - sft_bbc_category: the paper's LoRA regime (r 8, alpha 16, all linear layers, lr 1e-4, 10 warm-up
#   steps then linear decay) for 150 steps of B = 4 + 1 target row (~2-3 s a step on one thread), 300
#   test articles, perplexity at the end only; every method, 3 seeds.
# - sft_bbc_category-fracs: the bias-variance curve in that setting, layerwise at frac 1/8, 1/4, 3/4 (1/2
#   and 1 = standard come from the grid above) and frac: auto, 3 seeds.
# - sft_bbc_headline / sft_chatterbot_qa: the full fine-tuning regime of the earlier results (30 steps,
#   B = 8 + 2 target rows, lr 5e-5 constant), now with greedy and offline, 200 / 160 test examples (the
#   Q&A task has 181 questions on its four topics, 16 of them target examples).
SPECTRA = {
    "sft_bbc_category": ("configs/sft_bbc_category.yaml",
                         ["--spectrum.methods", ALL_METHODS, "--spectrum.seeds", "0,1,2", "--spectrum.fracs", "0.5"]),
    "sft_bbc_category-fracs": ("configs/sft_bbc_category.yaml",
                               ["--spectrum.methods", "layerwise", "--spectrum.seeds", "0,1,2",
                                "--spectrum.fracs", "0.125,0.25,0.75,auto"]),
    "sft_bbc_headline": ("configs/sft_bbc_headline.yaml",
                         ["--train.steps", "30", "--train.eval_every", "0", "--eval.at_start", "false",
                          "--train.threads", "1", "--data.test_size", "200", "--eval.n_test", "200",
                          "--spectrum.methods", ALL_METHODS, "--spectrum.seeds", "0,1,2", "--spectrum.fracs", "0.5"]),
    "sft_chatterbot_qa": ("configs/sft_chatterbot_qa.yaml",
                          ["--train.steps", "30", "--train.eval_every", "0", "--eval.at_start", "false",
                           "--train.threads", "1", "--data.test_size", "160", "--eval.n_test", "160",
                           "--spectrum.methods", ALL_METHODS, "--spectrum.seeds", "0,1,2", "--spectrum.fracs", "0.5"]),
}


def spectrum_args(name: str) -> list[str]:
    recipe, overrides = SPECTRA[name]
    return [recipe, *overrides, "--output_dir", OUT, "--run_name", f"spectrum-{name}"]


def load(name: str):
    from drpost.config import load_config

    recipe, *rest = spectrum_args(name)
    return load_config(ROOT / recipe, rest)


# ===================================================================================== running
def _finished_count() -> int:
    return sum(1 for _ in (ROOT / OUT).glob("*/runs/*/metrics.json"))


def _commit(message: str) -> None:
    commit_results(ROOT, OUT, message)


def run_grid(names: list[str], jobs: int, progress: bool, commit: bool) -> None:
    """Every spectrum of ``names`` with ``--resume``, at most ``jobs`` at a time (each its own process)."""
    queue, running = list(names), {}
    seen = _finished_count()
    while queue or running:
        while queue and len(running) < jobs:
            name = queue.pop(0)
            cmd = [sys.executable, "-m", "drpost.cli", "spectrum", *spectrum_args(name), "--resume"]
            if not progress:
                cmd.append("--no-progress")
            log = open(ROOT / OUT / f"spectrum-{name}.log", "a")
            print(f"[sft_results] start {name}: {' '.join(cmd[3:])}", flush=True)
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(20)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                print(f"[sft_results] {name} ended with exit code {proc.returncode}", flush=True)
        now = _finished_count()
        if commit and now != seen:
            _commit(f"results: {now} finished runs of the evidence grid (benchmarks/sft_results.py)")
            seen = now


# ===================================================================================== docs
def _fmt(mean, se, fmt=".3f") -> str:
    if mean is None:
        return "-"
    return format(mean, fmt) + ("" if se is None else f" ± {format(se, fmt)}")


def _spectrum_block(name: str, res: dict, n_grid: int) -> str:
    state = "complete" if res["complete"] else f"**partial: {len(res['runs'])} of {n_grid} runs finished**"
    return (f"<!-- BEGIN {name} -->\n"
            f"{len(res['runs'])} runs ({state}); mean ± standard error over seeds; Δ = paired difference to standard.\n\n"
            f"{res['table']}\n\n{res['tests']}\n\n"
            f"![{name}: metric and perplexity vs kept share](results/{name}/spectrum.png)\n\n"
            f"Per-run numbers: [runs.csv](results/{name}/runs.csv); run directories under `{OUT}/spectrum-{name}/runs/`.\n"
            f"<!-- END {name} -->")


def curve_block(main: dict, fracs: dict | None, out_dir: Path) -> str:
    """The bias-variance curve (layerwise against frac; frac 1 = standard) and frac: auto against the
    best fixed frac, paired by seed."""
    from drpost.plots import plot_frac_curve
    from drpost.recipes.spectrum import _paired_test
    from drpost.stats import verdict

    metric = main["metrics"][0]
    runs = main["runs"] + (fracs["runs"] if fracs else [])
    by_frac: dict = {}
    for r in runs:
        if r["method"] == "standard":
            by_frac.setdefault(1.0, []).append(r)
        elif r["method"] == "layerwise" and r["frac"] != "auto":
            by_frac.setdefault(float(r["frac"]), []).append(r)
    auto_runs = [r for r in runs if r["method"] == "layerwise" and r["frac"] == "auto"]

    def stats(rs):
        from drpost.recipes.spectrum import _mean_se

        out = {"n": len(rs)}
        for key in (metric, "test_ppl"):
            out[key], out[key + "_se"] = _mean_se([r.get(key) for r in rs])
        return out

    points = [{"frac": f, **stats(rs)} for f, rs in sorted(by_frac.items())]
    auto = None
    if auto_runs:
        kept = [r["kept"] for r in auto_runs if r.get("kept") is not None]
        auto = {"frac": sum(kept) / len(kept) if kept else 0.5, "frac_min": min(kept, default=0.5),
                "frac_max": max(kept, default=0.5), **stats(auto_runs)}
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_frac_curve(points, metric, out_dir / "frac_curve.png", title="sft_bbc_category: layerwise against frac",
                    auto=auto)
    lines = [f"| frac | seeds | {metric} | test ppl |", "|---|---|---|---|"]
    for p in points:
        label = "1 (= standard)" if p["frac"] == 1.0 else f"{p['frac']:g}"
        lines.append(f"| {label} | {p['n']} | {_fmt(p[metric], p[metric + '_se'])} | "
                     f"{_fmt(p['test_ppl'], p['test_ppl_se'], '.2f')} |")
    if auto:
        lines.append(f"| auto (mean chosen {auto['frac']:.2f}, per seed {auto['frac_min']:.3g}-{auto['frac_max']:.3g}) | "
                     f"{auto['n']} | {_fmt(auto[metric], auto[metric + '_se'])} | "
                     f"{_fmt(auto['test_ppl'], auto['test_ppl_se'], '.2f')} |")
    text = "\n".join(lines)
    fixed = [p for p in points if p["frac"] < 1.0 and p.get(metric) is not None]
    if auto and fixed:
        best = max(fixed, key=lambda p: p[metric])
        parts = []
        for key, lower in ((metric, False), ("test_ppl", True)):
            t = _paired_test(auto_runs, by_frac[best["frac"]], key)
            diff = "-" if t.mean is None else f"{t.mean:+.3f}" + ("" if t.se is None else f" ± {t.se:.3f}")
            parts.append(f"{'perplexity' if key == 'test_ppl' else key} {diff} "
                         f"(p = {'-' if t.p is None else f'{t.p:.3f}'}, n = {t.n}: {verdict(t, lower)})")
        text += (f"\n\n`frac: auto` against the best fixed frac ({best['frac']:g}, best mean {metric}), paired by "
                 f"seed: " + "; ".join(parts) + ".")
    return ("<!-- BEGIN frac_curve -->\n" + text + "\n\n![layerwise against frac](results/frac_curve/frac_curve.png)\n"
            "<!-- END frac_curve -->")


def write_docs(results: dict[str, dict], grids: dict[str, int], docs: Path) -> None:
    page = docs / "results.md"
    text = page.read_text() if page.is_file() else "# Results\n"
    blocks = {}
    for name, res in results.items():
        target = docs / "results" / name
        target.mkdir(parents=True, exist_ok=True)
        src = Path(res["spectrum_dir"])
        for f in ("summary.md", "spectrum.png", "curves.png", "summary.csv", "runs.csv"):
            if (src / f).is_file():
                shutil.copy(src / f, target / f)
        blocks[name] = _spectrum_block(name, res, grids[name])
    if "sft_bbc_category" in results:
        blocks["frac_curve"] = curve_block(results["sft_bbc_category"], results.get("sft_bbc_category-fracs"),
                                           docs / "results" / "frac_curve")
    for name, block in blocks.items():
        pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    page.write_text(text)
    print(f"wrote {page} ({', '.join(blocks)})", flush=True)


def tables(names: list[str]) -> tuple[dict, dict]:
    from drpost.recipes.common import RunDirError
    from drpost.recipes.spectrum import grid, write_finished

    results, grids = {}, {}
    for name in names:
        cfg = load(name)
        try:
            results[name] = write_finished(cfg)
            grids[name] = len(grid(cfg))
        except RunDirError as err:
            print(f"[sft_results] {name}: {err}", flush=True)
    return results, grids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SPECTRA), help="comma-separated subset of " + ", ".join(SPECTRA))
    p.add_argument("--jobs", type=int, default=1, help="spectra run side by side (2 on a 2-core CPU)")
    p.add_argument("--tables-only", action="store_true", help="only re-write the docs from the finished runs")
    p.add_argument("--commit", action="store_true", help="git-commit results/ every time a run finishes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    os.chdir(ROOT)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SPECTRA]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {', '.join(SPECTRA)}")
    if not args.tables_only:
        (ROOT / OUT).mkdir(parents=True, exist_ok=True)
        run_grid(names, max(1, args.jobs), not args.no_progress, args.commit)
    results, grids = tables(list(SPECTRA) if args.tables_only else names)
    write_docs(results, grids, ROOT / "docs")
    print(json.dumps({n: f"{len(r['runs'])}/{grids[n]} runs" for n, r in results.items()}), flush=True)


if __name__ == "__main__":
    main()
