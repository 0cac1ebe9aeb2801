"""The bias-variance spectrum of feasible sets, measured: :func:`run_spectrum` (``drpost spectrum``).

One recipe (a :class:`~drpost.config.Config`) is trained once per point of the grid
``spectrum.methods x spectrum.fracs x spectrum.seeds`` with :func:`drpost.recipes.sft.run_sft`;
everything else (data, model, steps, learning rate, evaluation) is shared, so the runs differ only
in the feasible set, its ``frac`` and the seed. ``standard`` (the whole general batch) and
``target_only`` (no general data) have no ``frac``: they run once per seed and sit at the two ends
of the spectrum (kept share 1 and 0) in the plots. ``auto`` among ``spectrum.fracs`` is a point
trained with ``drpost.frac: auto`` (run ``<method>-fracauto-seed<s>``), plotted at the mean frac its
steps used.

The seed sets ``train.seed`` and, unless ``data.seed`` is fixed, the data seed too: each seed is
a different draw of the target examples, the test split and the general pool, shared by every
method of that seed. Differences between methods are therefore also reported *paired by seed*
(method minus standard on the same seed), which removes the draw-to-draw spread they share.

Spectrum directory ``<output_dir>/<run_name>/``:

- ``config.yaml``: the resolved recipe (with its ``spectrum`` section);
- ``runs/<method>[-frac<f>]-seed<s>/``: one ``drpost train`` run directory each;
- ``runs.csv``: one row per run; ``summary.csv`` / ``summary.md``: per (method, frac) the mean and
  standard error over seeds of the test metric(s), test perplexity, best-vs-final perplexity,
  paired differences to standard, the target-like share kept, seconds per step relative to
  standard; ``spectrum.json``: all of it plus the per-step histories;
- ``spectrum.png``: test metric and perplexity against the kept share of the general batch;
  ``curves.png``: test perplexity and training loss against the step (mean over seeds).

``resume=True`` keeps the finished runs (those with a ``metrics.json`` whose config is the one
this grid asks for) and redoes the others, so an interrupted spectrum loses at most one run. A run
whose directory is gone (a fresh clone carries only the spectrum's own files) is kept from its row in
``spectrum.json`` when that row has this grid point's run directory and step count.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from drpost.config import Config, config_from_dict, config_to_dict, load_config, save_config
from drpost.recipes.common import RunDirError, jsonable
from drpost.plots import method_label
from drpost.recipes.offline import OFFLINE_SHARE
from drpost.recipes.sft import run_sft
from drpost.stats import ALPHA, paired, verdict

__all__ = ["run_spectrum", "finished_runs", "write_finished", "grid", "summarise", "format_summary", "comparisons", "format_comparisons",
           "UNCONSTRAINED", "BASELINES"]

# Methods without a frac: they run once per seed; standard and target_only at the ends of the
# spectrum, offline (LESS-style selection of the pool, then standard training) at 1 (whole batches).
UNCONSTRAINED = {"standard": 1.0, "target_only": 0.0, "offline": 1.0}
# The methods drpost is compared with (the best of them is "the best baseline" of the paired tests).
BASELINES = ("standard", "offline", "greedy", "random", "target_only")
_GEN_METRICS = ("rougeL", "rouge1", "rouge2", "token_f1", "exact_match")


def frac_text(frac) -> str:
    """A grid point's frac as written in names and tables: '0.25', 'auto' (chosen online), '-' (none)."""
    return "-" if frac is None else frac if isinstance(frac, str) else f"{frac:g}"


@dataclass(frozen=True)
class GridPoint:
    method: str
    frac: float | str | None  # None: standard / target_only; "auto": drpost.frac: auto (chosen online)
    seed: int

    @property
    def name(self) -> str:
        frac = "" if self.frac is None else f"-frac{frac_text(self.frac)}"
        return f"{self.method}{frac}-seed{self.seed}"

    @property
    def kept(self) -> float | None:
        """Share of the general batch a step keeps (per layer): the x axis of the spectrum. None for
        frac 'auto', known after the run (:func:`run_row` takes the mean frac of its steps)."""
        if self.frac == "auto":
            return None
        return UNCONSTRAINED[self.method] if self.frac is None else self.frac


def grid(cfg: Config) -> list[GridPoint]:
    """The runs of a spectrum, method-major (all seeds of a method together)."""
    sp = cfg.spectrum
    points = []
    for method in sp.methods:
        fracs = [None] if method in UNCONSTRAINED else sp.fracs
        points += [GridPoint(method, f, s) for f in fracs for s in sp.seeds]
    return points


def point_config(cfg: Config, point: GridPoint) -> Config:
    """The ``drpost train`` config of one grid point."""
    raw = config_to_dict(cfg)
    method = "standard" if point.method == "offline" else point.method
    raw["drpost"].update(feasible_set=method, frac=1.0 if point.frac is None else point.frac)
    raw["data"]["offline_share"] = (cfg.data.offline_share or OFFLINE_SHARE) if point.method == "offline" else 0.0
    raw["train"]["seed"] = point.seed
    if not cfg.spectrum.save_models:
        raw["train"].update(save_final=False, save_steps=0)
    raw["output_dir"] = str(cfg.run_dir / "runs")
    raw["run_name"] = point.name
    return config_from_dict(raw, f"spectrum point {point.name}")


# ===================================================================================== running
def run_spectrum(cfg: Config, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train every grid point and write the tables and plots; returns the ``spectrum.json`` dict."""
    from tqdm.auto import tqdm

    out = cfg.run_dir
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RunDirError("drpost spectrum runs in one process; under torchrun launch its points one by one with "
                          "`torchrun ... drpost train CONFIG --drpost.feasible_set X --run_name Y`")
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise RunDirError(f"spectrum directory {out} already exists and is not empty: pass --resume to keep its "
                          "finished runs and do the rest, --overwrite to start again, or choose another --run_name")
    if resume and (out / "config.yaml").is_file():
        _check_same_recipe(load_config(out / "config.yaml"), cfg, out)
    points = grid(cfg)
    configs = [point_config(cfg, p) for p in points]  # validates every point before any training
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    print(f"drpost spectrum: {len(points)} runs ({', '.join(cfg.spectrum.methods)}; frac "
          f"{', '.join(frac_text(f) for f in cfg.spectrum.fracs)}; seeds {', '.join(map(str, cfg.spectrum.seeds))}) "
          f"-> {out}", flush=True)

    t0 = time.perf_counter()
    runs: list[dict] = []
    saved = _saved_rows(out) if resume else {}
    bar = tqdm(list(zip(points, configs)), desc="spectrum", unit="run", disable=not progress, dynamic_ncols=True)
    for point, pcfg in bar:
        bar.set_postfix_str(point.name)
        row = _finished_row(point, pcfg, saved) if resume else None
        if row is None:
            row = run_row(point, run_sft(pcfg, overwrite=True, progress=progress))
        else:
            print(f"spectrum: keeping the finished run {pcfg.run_dir}", flush=True)
        runs.append(row)
        _write(out, cfg, runs, final=False)  # partial tables survive an interruption
    bar.close()
    result = _write(out, cfg, runs, final=True)
    result["seconds_total"] = time.perf_counter() - t0
    (out / "spectrum.json").write_text(json.dumps(jsonable(result), indent=1))
    print("\n" + result["table"] + "\n", flush=True)
    print(f"spectrum directory: {out} (summary.md, summary.csv, runs.csv, spectrum.png, curves.png)", flush=True)
    return result


def finished_runs(cfg: Config) -> list[dict]:
    """The rows (:func:`run_row`) of the grid points whose run has finished, in grid order."""
    rows, saved = [], _saved_rows(cfg.run_dir)
    if saved and (cfg.run_dir / "config.yaml").is_file():
        try:
            _check_same_recipe(load_config(cfg.run_dir / "config.yaml"), cfg, cfg.run_dir)
        except RunDirError:
            saved = {}  # rows of another recipe: only run directories that match count
    for point in grid(cfg):
        row = _finished_row(point, point_config(cfg, point), saved)
        if row is not None:
            rows.append(row)
    return rows


def write_finished(cfg: Config) -> dict:
    """Tables and plots of a spectrum from its finished runs only (e.g. while the grid still runs, or
    after it was interrupted); ``complete`` says whether every grid point is in."""
    runs = finished_runs(cfg)
    if not runs:
        raise RunDirError(f"no finished run in {cfg.run_dir}: nothing to tabulate")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    result = _write(cfg.run_dir, cfg, runs, final=True)
    result["complete"] = len(runs) == len(grid(cfg))
    (cfg.run_dir / "spectrum.json").write_text(json.dumps(jsonable(result), indent=1))
    return result


def _check_same_recipe(saved: Config, cfg: Config, out: Path) -> None:
    a, b = config_to_dict(saved), config_to_dict(cfg)
    diffs = [f"{s}.{k}" for s in b if isinstance(b[s], dict) and s != "spectrum"
             for k in b[s] if a.get(s, {}).get(k) != b[s][k]]
    if diffs:
        raise RunDirError(f"cannot resume the spectrum in {out} with a different recipe: {', '.join(diffs)} changed "
                          "(only the spectrum grid may change; use --overwrite or another --run_name)")


def _saved_rows(out: Path) -> dict[str, dict]:
    """The run rows recorded in ``out/spectrum.json``, by run directory (empty when there is none)."""
    try:
        runs = json.loads((out / "spectrum.json").read_text()).get("runs", [])
    except (OSError, ValueError):
        return {}
    return {str(r["run_dir"]): r for r in runs if isinstance(r, dict) and "run_dir" in r}


def _finished_row(point: GridPoint, pcfg: Config, saved: dict[str, dict]) -> dict | None:
    """The row of a finished run of this grid point: from its run directory, else (the directory is
    gone) from the spectrum's own record of it, if that was a run of this point with as many steps."""
    metrics = _finished(pcfg)
    if metrics is not None:
        return run_row(point, metrics)
    if pcfg.run_dir.exists():
        return None  # an interrupted run, or one of another config: redo it
    row = saved.get(str(pcfg.run_dir))
    if row is None or row.get("steps") != pcfg.train.steps or row.get("method") != point.method \
            or row.get("seed") != point.seed or row.get("frac") != point.frac:
        return None
    return row


def _finished(pcfg: Config) -> dict | None:
    """The metrics of a finished run of exactly this config, else None."""
    run_dir = pcfg.run_dir
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        saved = load_config(run_dir / "config.yaml")
    except (OSError, ValueError):
        return None
    if _without_grid(saved) != _without_grid(pcfg) or metrics.get("steps") != pcfg.train.steps:
        return None
    return metrics


def _without_grid(cfg: Config) -> dict:
    return {k: v for k, v in config_to_dict(cfg).items() if k != "spectrum"}


# ===================================================================================== tables
def run_row(point: GridPoint, m: dict) -> dict:
    """One run, flat (a ``runs.csv`` row) plus its histories."""
    final = m["final"]
    kept = point.kept if point.frac != "auto" else (m.get("auto_frac") or {}).get("mean_frac")
    row = {"method": point.method, "frac": point.frac, "kept": kept, "seed": point.seed,
           "run_dir": m["run_dir"], "steps": m["steps"], "test_ppl": final["test_ppl"],
           "start_ppl": (m.get("start") or {}).get("ppl"), "best_ppl": (m.get("best") or {}).get("ppl"),
           "best_step": (m.get("best") or {}).get("step"), "final_over_best": m.get("final_over_best"),
           "seconds_per_step": m.get("seconds_per_step"),
           "target_like_batch": (m.get("target_like") or {}).get("batch"),
           "target_like_chosen": (m.get("target_like") or {}).get("chosen"),
           "skipped_steps": sum(h.get("skipped_steps", 0) or 0 for h in m["history"]["train"]),
           "selection_cost_in_steps": (m.get("offline") or {}).get("cost_in_steps")}
    for name in _GEN_METRICS:
        if name in final:
            row[name] = final[name]
    row["metrics"] = [n for n in (m.get("task") or {}).get("metrics", []) if n in final]  # the task's own
    row["history"] = m["history"]
    return row


def _mean_se(values: list) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return mean, se


def metric_names(runs: list[dict]) -> list[str]:
    """The generation metrics the runs' task reports (e.g. ``rougeL``; ``runs.csv`` has them all)."""
    chosen = {n for r in runs for n in r.get("metrics", [])}
    return [n for n in _GEN_METRICS if n in chosen and all(n in r for r in runs)]


def summarise(runs: list[dict]) -> list[dict]:
    """Per (method, frac): mean and standard error over seeds, and paired differences to standard.

    ``d_<x>`` is the mean over seeds of ``x(method, seed) - x(standard, seed)`` (seeds without a
    standard run are left out), ``time_ratio`` the mean of ``seconds_per_step(method, seed) /
    seconds_per_step(standard, seed)``."""
    standard = {r["seed"]: r for r in runs if r["method"] == "standard"}
    keys = ["test_ppl", "best_ppl", "final_over_best", "target_like_batch", "target_like_chosen",
            "seconds_per_step", "selection_cost_in_steps"] + metric_names(runs)
    out = []
    for (method, frac), rs in _group_runs(runs).items():
        kept = [r["kept"] for r in rs if r.get("kept") is not None]  # frac auto: the mean frac used, per seed
        s = {"method": method, "frac": frac, "kept": sum(kept) / len(kept) if kept else None, "n": len(rs),
             "seeds": [r["seed"] for r in rs]}
        for k in keys:
            s[k], s[k + "_se"] = _mean_se([r.get(k) for r in rs])
        pairs = [(r, standard[r["seed"]]) for r in rs if r["seed"] in standard]
        for k in ["test_ppl"] + metric_names(runs):
            s["d_" + k], s["d_" + k + "_se"] = _mean_se(
                [r[k] - st[k] for r, st in pairs if r.get(k) is not None and st.get(k) is not None])
            s["d_" + k + "_p"] = _paired_test(rs, list(standard.values()), k).p
        s["time_ratio"], s["time_ratio_se"] = _mean_se(
            [r["seconds_per_step"] / st["seconds_per_step"] for r, st in pairs
             if r.get("seconds_per_step") and st.get("seconds_per_step")])
        out.append(s)
    return out


def _by_seed(rs: list[dict], key: str) -> dict:
    return {r["seed"]: r[key] for r in rs if r.get(key) is not None}


def _paired_test(a: list[dict], b: list[dict], key: str):
    """``key`` of runs ``a`` minus runs ``b``, paired by seed (:func:`drpost.stats.paired`)."""
    return paired(_by_seed(a, key), _by_seed(b, key))


def _group_runs(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["frac"]), []).append(r)
    return groups


def comparisons(runs: list[dict], key: str) -> list[dict]:
    """Every (method, frac) against standard and against the best baseline (:data:`BASELINES`: the one,
    other than itself, with the best mean ``key`` over seeds), paired by seed, with the paired t-test's
    p-value and a verdict only where p < 0.05 (:func:`drpost.stats.verdict`). ``key`` is ``test_ppl``
    (lower is better) or a generation metric (higher is better)."""
    lower = key == "test_ppl"
    groups = _group_runs(runs)
    means = {g: sum(v) / len(v) for g, rs in groups.items() if (v := [r[key] for r in rs if r.get(key) is not None])}
    standard = groups.get(("standard", None), [])
    out = []
    for g, rs in groups.items():
        if g not in means:
            continue
        row = {"method": g[0], "frac": g[1], "key": key, "n": len(rs), "mean": means[g]}
        if g != ("standard", None) and standard:
            t = _paired_test(rs, standard, key)
            row.update(vs_standard=t, vs_standard_verdict=verdict(t, lower))
        rivals = [b for b in means if b[0] in BASELINES and b != g]
        if rivals:
            best = min(rivals, key=lambda b: means[b]) if lower else max(rivals, key=lambda b: means[b])
            t = _paired_test(rs, groups[best], key)
            row.update(best_baseline=method_label(*best), vs_best=t, vs_best_verdict=verdict(t, lower))
        out.append(row)
    return out


def format_comparisons(rows: list[dict], title: str) -> str:
    """The Markdown table of :func:`comparisons` for one key."""
    def diff(t):
        if t is None or t.mean is None:
            return "-", "-"
        text = format(t.mean, "+.3f" if abs(t.mean) < 10 else "+.2f") + ("" if t.se is None else f" ± {t.se:.3f}")
        return text, "-" if t.p is None else f"{t.p:.3f}"

    head = ["method", "seeds", title, "Δ vs standard", "p", "verdict", "best baseline", "Δ vs best baseline", "p",
            "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d1, p1 = diff(r.get("vs_standard"))
        d2, p2 = diff(r.get("vs_best"))
        lines.append("| " + " | ".join([
            method_label(r["method"], r["frac"]), str(r["n"]), f"{r['mean']:.3f}" if r["key"] != "test_ppl" else f"{r['mean']:.2f}",
            d1, p1, r.get("vs_standard_verdict", "") if "vs_standard" in r else "",
            r.get("best_baseline", "-"), d2, p2, r.get("vs_best_verdict", "") if "vs_best" in r else ""]) + " |")
    return "\n".join(lines)


def comparison_tables(runs: list[dict]) -> str:
    """The paired-test tables of a spectrum: one per target metric, one for test perplexity."""
    parts = []
    for key in metric_names(runs) + ["test_ppl"]:
        title = "test perplexity" if key == "test_ppl" else key
        parts.append(f"Paired by seed, two-sided paired t-test; a verdict only where p < {ALPHA:g}, "
                     f"{'lower' if key == 'test_ppl' else 'higher'} is better:\n\n"
                     + format_comparisons(comparisons(runs, key), title))
    return "\n\n".join(parts)


def _pm(mean, se, fmt: str) -> str:
    if mean is None:
        return "-"
    text = format(mean, fmt)
    return text + (f" ± {format(se, fmt)}" if se is not None else "")


def _signed(mean, se, fmt: str) -> str:
    if mean is None:
        return "-"
    return format(mean, "+" + fmt) + (f" ± {format(se, fmt)}" if se is not None else "")


def format_summary(summary: list[dict], metrics: list[str]) -> str:
    """The Markdown table of :func:`summarise` (mean ± standard error over seeds)."""
    head = ["method", "frac", "seeds"]
    for name in metrics:
        head += [name, f"Δ{name} vs standard"]
    head += ["test ppl", "Δppl vs standard", "final / best ppl", "target-like: batch → kept", "s/step ÷ standard"]
    costs = any(s.get("selection_cost_in_steps") is not None for s in summary)
    if costs:  # offline selection: its warm-up + scoring, in training steps of the same run
        head.append("selection cost (steps)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["method"], frac_text(s["frac"]), str(s["n"])]
        for name in metrics:
            cells += [_pm(s.get(name), s.get(name + "_se"), ".3f"),
                      "" if s["method"] == "standard" else _signed(s.get("d_" + name), s.get("d_" + name + "_se"), ".3f")]
        cells += [_pm(s["test_ppl"], s["test_ppl_se"], ".2f"),
                  "" if s["method"] == "standard" else _signed(s["d_test_ppl"], s["d_test_ppl_se"], ".2f"),
                  _pm(s["final_over_best"], s["final_over_best_se"], ".3f")]
        if s["target_like_batch"] is None or s["method"] == "target_only":  # trains on no general row
            cells.append("-")
        else:
            kept = "-" if s["target_like_chosen"] is None else f"{s['target_like_chosen']:.1%}"
            cells.append(f"{s['target_like_batch']:.1%} → {kept}")
        cells.append(_pm(s["time_ratio"], s["time_ratio_se"], ".2f"))
        if costs:
            cells.append(_pm(s.get("selection_cost_in_steps"), s.get("selection_cost_in_steps_se"), ".0f")
                         if s.get("selection_cost_in_steps") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(out: Path, cfg: Config, runs: list[dict], final: bool) -> dict:
    flat = [{k: v for k, v in r.items() if k not in ("history", "metrics")} for r in runs]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(flat)
    summary = summarise(runs)
    names = metric_names(runs)
    with open(out / "summary.csv", "w", newline="") as f:
        cols = list(dict.fromkeys(k for s in summary for k in s if k != "seeds"))
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(summary)
    table = format_summary(summary, names)
    tests = comparison_tables(runs)
    (out / "summary.md").write_text(_summary_markdown(cfg, runs, table) + "\n" + tests + "\n")
    result = {"spectrum_dir": str(out), "table": table, "tests": tests, "summary": summary, "runs": runs,
              "metrics": names,
              "complete": final, "config": config_to_dict(cfg)}
    if final:
        from drpost.plots import plot_spectrum, plot_spectrum_curves

        plot_spectrum(summary, names, out / "spectrum.png", title=_title(cfg, runs))
        plot_spectrum_curves(runs, out / "curves.png", title=_title(cfg, runs))
    return result


def _title(cfg: Config, runs: list[dict]) -> str:
    task = cfg.data.target.get("task") if isinstance(cfg.data.target, dict) else cfg.data.target
    return f"{cfg.run_name}: target {task}, {cfg.train.steps} steps, {len({r['seed'] for r in runs})} seed(s)"


def _summary_markdown(cfg: Config, runs: list[dict], table: str) -> str:
    t, d = cfg.train, cfg.data
    return (f"# Spectrum {cfg.run_name}\n\n"
            f"Model {cfg.model.name}{'' if cfg.model.num_layers is None else f' ({cfg.model.num_layers} layers)'}, "
            f"{'LoRA r=%d' % t.lora_r if t.lora_r else 'full fine-tuning'}, {t.steps} steps, lr {t.lr:g}, "
            f"general batch {t.batch_size} x {t.grad_accum}, {cfg.drpost.target_batch_size} target rows per step, "
            f"n_target {d.n_target}, scoring {cfg.drpost.scoring}, score_norm {cfg.drpost.score_norm}. "
            f"{len(runs)} runs; mean ± standard error over seeds; Δ = paired difference to standard on the same "
            "seed.\n\n" + table + "\n")
