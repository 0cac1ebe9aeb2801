"""Plots of a ``drpost demo`` run (matplotlib, Agg backend: no display needed).

:func:`plot_demo` reads the ``metrics`` dict that :func:`drpost.recipes.demo.run_demo` writes to
``metrics.json`` and saves, in the run directory:

- ``ppl.png``: held-out test perplexity vs step, one line per method (target-only's
  over-fitting shows as a curve that turns back up);
- ``selection.png``: share of target-like (headline) rows among the rows the selection kept,
  per step (dots) and cumulated over the run (lines), against the same share in the batches;
- ``heatmap.png``: layerwise only: per decoder block and step, the fraction of the batch's
  headline rows that the block's layers kept (steps whose batch has no headline row are left
  out), next to the full chosen mask (modules x rows) of one early batch;
- ``demo.png``: all of the above in one figure.

Every panel plots only what is in ``metrics``; missing pieces (e.g. no layerwise run) leave a
panel with a short note instead of failing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

__all__ = ["plot_curves", "plot_demo", "plot_spectrum", "plot_spectrum_curves", "plot_frac_curve", "METHOD_COLORS"]

METHOD_COLORS = {
    "standard": "#1f77b4",
    "global": "#2ca02c",
    "layerwise": "#d62728",
    "random": "#7f7f7f",
    "target_only": "#ff7f0e",
    "rowwise": "#9467bd",
    "filter": "#8c564b",
    "greedy": "#e377c2",
    "offline": "#17becf",
}
_KIND_COLORS = {"headline": "#d62728", "classification": "#1f77b4", "chat": "#2ca02c", "continuation": "#9467bd",
                "bbc_headline": "#d62728", "bbc_category": "#1f77b4", "chatterbot_qa": "#2ca02c",
                "bbc_continuation": "#9467bd"}
_TARGET_LIKE = ("headline", "bbc_headline")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _color(method: str, i: int) -> str:
    return METHOD_COLORS.get(method, f"C{i % 10}")


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _nan(v):
    return math.nan if v is None else float(v)


def _panel_ppl(ax, metrics: dict) -> None:
    results = metrics.get("results", {})
    if not results:
        _note(ax, "no runs")
        return
    for i, (method, r) in enumerate(results.items()):
        curve = r.get("curve") or []
        if not curve:
            continue
        ax.plot(
            [c["step"] for c in curve], [c["test_ppl"] for c in curve], marker="o", ms=3,
            lw=1.6, color=_color(method, i), label=method,
        )
    base = metrics.get("base", {}).get("test_ppl")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    _integer_x(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("test perplexity (log scale)")
    title = "(a) held-out test perplexity"
    if base is not None:
        title += f" (base model {base:.1f})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _cumulative(num: list, den: list) -> list:
    out, n, d = [], 0.0, 0.0
    for a, b in zip(num, den):
        n, d = n + a, d + b
        out.append(n / d if d else math.nan)
    return out


def _panel_selection(ax, metrics: dict) -> None:
    results = metrics.get("results", {})
    selecting = [m for m, r in results.items() if r.get("selects") and r.get("history")]
    if not selecting:
        _note(ax, "no selecting method in this run\n(global / layerwise / random)")
        return
    ref = results[selecting[0]]["history"]
    steps = [h["step"] for h in ref]
    batch = [_nan(h.get("batch_headline_share")) for h in ref]
    ax.step(steps, batch, where="mid", color="black", lw=0.8, alpha=0.35, label="batch share (per step)")
    cum_batch = _cumulative([h["batch_headline"] for h in ref], [h["batch_rows"] for h in ref])
    ax.plot(steps, cum_batch, color="black", ls="--", lw=1.5, label="batch share (cumulative)")
    for i, method in enumerate(results):
        if method not in selecting:
            continue
        hist = results[method]["history"]
        color = _color(method, i)
        xs = [h["step"] for h in hist]
        ax.plot(xs, [_nan(h.get("chosen_headline_share")) for h in hist], ls="none", marker="o", ms=3,
                alpha=0.45, color=color)
        cum = _cumulative([h.get("chosen_headline_picks", 0) for h in hist], [h.get("chosen_picks", 0) for h in hist])
        ax.plot(xs, cum, lw=1.8, color=color, label=f"{method} (cumulative; dots: per step)")
    ax.set_ylim(bottom=0)
    _integer_x(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of headline rows")
    ax.set_title("(b) headline (target-like) rows among the rows kept by the selection", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def _panel_heatmap(ax, fig, metrics: dict) -> None:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    r = metrics.get("results", {}).get("layerwise", {})
    heat = r.get("layer_pick_rate")
    if not heat or not heat.get("steps"):
        _note(ax, "per-layer heat map: needs a layerwise run\nwith headline rows in some batch")
        return
    rate = np.array([[_nan(v) for v in row] for row in heat["rate"]], dtype=float)  # [blocks, steps]
    frac = float(metrics.get("config", {}).get("frac", 0.5))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=min(max(frac, 1e-3), 1 - 1e-3), vmax=1.0)
    im = ax.imshow(np.ma.masked_invalid(rate), aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                   origin="lower")
    steps = heat["steps"]
    n = len(steps)
    ticks = list(range(0, n, max(1, n // 12)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[t]) for t in ticks], fontsize=7)
    blocks = heat["blocks"]
    yt = list(range(0, len(blocks), max(1, len(blocks) // 10)))
    ax.set_yticks(yt)
    ax.set_yticklabels([str(blocks[t]) for t in yt], fontsize=7)
    ax.set_xlabel("training step (only steps whose batch holds a headline row)")
    ax.set_ylabel("decoder block")
    ax.set_title(f"(c) layerwise: share of the batch's headline rows kept, per block\n"
                 f"(red > {frac:g} = favoured, {frac:g} = random, blue = avoided)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)


def _panel_mask(ax, metrics: dict) -> None:
    import numpy as np

    r = metrics.get("results", {}).get("layerwise", {})
    ex = r.get("example_mask")
    if not ex:
        _note(ax, "chosen mask of one batch: needs a layerwise run")
        return
    mask = np.array(ex["mask"], dtype=float)  # [modules, rows]
    ax.imshow(mask, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    kinds = ex["kinds"]
    kept = mask.mean(0)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels([f"{k} {s:.2f}" for k, s in zip(kinds, kept)], rotation=60, ha="right", fontsize=7)
    for tick, kind in zip(ax.get_xticklabels(), kinds):
        tick.set_color(_KIND_COLORS.get(kind, "black"))
        if kind in _TARGET_LIKE:
            tick.set_fontweight("bold")
    modules = ex["modules"]
    yt = list(range(0, len(modules), max(1, len(modules) // 12)))
    ax.set_yticks(yt)
    ax.set_yticklabels([_short(modules[t]) for t in yt], fontsize=7)
    ax.set_ylabel("scored layer (forward order)")
    ax.set_title(f"(d) layerwise: rows kept by each layer in the step-{ex['step']} batch (black = kept)\n"
                 "x labels: the row's kind and the share of layers keeping it", fontsize=10)


def _short(module: str) -> str:
    """``model.layers.12.self_attn.q_proj`` -> ``12 q_proj``."""
    m = re.search(r"\.(\d+)\.(?:.*\.)?([^.]+)$", module)
    return f"{m.group(1)} {m.group(2)}" if m else module


def plot_demo(metrics: dict, run_dir: str | Path) -> Path:
    """Write ``demo.png`` (plus ``ppl.png``, ``selection.png``, ``heatmap.png``) to ``run_dir``;
    return the path of ``demo.png``."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    _panel_ppl(axes[0, 0], metrics)
    _panel_selection(axes[0, 1], metrics)
    _panel_heatmap(axes[1, 0], fig, metrics)
    _panel_mask(axes[1, 1], metrics)
    cfg = metrics.get("config", {})
    fig.suptitle(
        f"drpost demo: {metrics.get('model_name', cfg.get('model', ''))}, BBC tech headlines "
        f"({cfg.get('n_target', '?')} target examples), {cfg.get('steps', '?')} steps, seed {cfg.get('seed', '?')} "
        f"(a single seed)",
        fontsize=12,
    )
    fig.tight_layout()
    path = run_dir / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)

    for name, draw, size in (
        ("ppl.png", lambda ax, f: _panel_ppl(ax, metrics), (7.5, 5)),
        ("selection.png", lambda ax, f: _panel_selection(ax, metrics), (7.5, 5)),
        ("heatmap.png", lambda ax, f: _panel_heatmap(ax, f, metrics), (8, 6)),
    ):
        f, ax = plt.subplots(figsize=size)
        draw(ax, f)
        f.tight_layout()
        f.savefig(run_dir / name, dpi=110)
        plt.close(f)
    return path


# ------------------------------------------------------------------------------ drpost spectrum
def method_label(method: str, frac) -> str:
    """A (method, frac) grid point as plots and tables name it: 'standard', 'layerwise 0.5', 'layerwise auto'."""
    return method if frac is None else f"{method} {frac}" if isinstance(frac, str) else f"{method} {frac:g}"


def plot_spectrum(summary: list[dict], metric_names: list[str], path: str | Path, title: str = "") -> Path:
    """``drpost spectrum``: the target test metric(s) and test perplexity (mean ± standard error over
    seeds) against the share of the general batch a step keeps: target-only at 0 (no general data),
    the selecting methods at their ``frac``, standard at 1 (the whole batch)."""
    plt = _pyplot()
    panels = list(metric_names[:2]) + ["test_ppl"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    methods = list(dict.fromkeys(s["method"] for s in summary))
    for ax, key in zip(axes[0], panels):
        for i, method in enumerate(methods):
            pts = sorted((s["kept"], s.get(key), s.get(key + "_se")) for s in summary
                         if s["method"] == method and s.get(key) is not None)
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=[_nan(e) if e is not None else 0.0 for e in es], marker="o", capsize=3,
                        color=_color(method, i), label=method, linestyle="-" if len(pts) > 1 else "none")
        ax.set_xlabel("kept share of the general batch (0 = target only, 1 = standard)")
        ax.set_ylabel("test perplexity" if key == "test_ppl" else f"test {key}")
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if key == "test_ppl":
            ys = [s["test_ppl"] for s in summary if s.get("test_ppl") is not None]
            if ys and max(ys) / max(min(ys), 1e-9) > 4:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    return _save_seed_figure(plt, fig, path, title)


def plot_frac_curve(points: list[dict], metric: str, path: str | Path, title: str = "",
                    auto: dict | None = None) -> Path:
    """The bias-variance curve: the target metric and test perplexity (mean ± SE over seeds) of one
    feasible set against its ``frac`` (``points``: dicts with ``frac``, ``<metric>``, ``<metric>_se``,
    ``test_ppl``, ``test_ppl_se``; frac 1 keeps every sample, i.e. standard training). ``auto``: the
    ``frac: auto`` runs, drawn at their mean chosen frac with a horizontal bar over the seeds' range."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2))
    pts = sorted(points, key=lambda p: p["frac"])
    for ax, key in zip(axes, (metric, "test_ppl")):
        xs = [p["frac"] for p in pts if p.get(key) is not None]
        ys = [p[key] for p in pts if p.get(key) is not None]
        es = [_nan(p.get(key + "_se")) if p.get(key + "_se") is not None else 0.0 for p in pts if p.get(key) is not None]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=METHOD_COLORS["layerwise"], label="fixed frac")
        if auto and auto.get(key) is not None:
            lo, hi = auto.get("frac_min", auto["frac"]), auto.get("frac_max", auto["frac"])
            ax.errorbar([auto["frac"]], [auto[key]], yerr=[_nan(auto.get(key + "_se") or 0.0)],
                        xerr=[[auto["frac"] - lo], [hi - auto["frac"]]], marker="*", markersize=12, capsize=3,
                        color="black", linestyle="none", label="frac: auto (mean chosen)")
        ax.set_xticks([0.125, 0.25, 0.5, 0.75, 1.0])
        ax.set_xticklabels(["1/8", "1/4", "1/2", "3/4", "1\n(standard)"])
        ax.set_xlim(0.05, 1.05)
        ax.set_xlabel("frac: kept share of the general batch per layer")
        ax.set_ylabel("test perplexity" if key == "test_ppl" else f"test {key}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save_seed_figure(plt, fig, path, title)


def _save_seed_figure(plt, fig, path, title: str) -> Path:
    """Title (over-seed statistics), layout, save, close."""
    if title:
        fig.suptitle(title + " (mean ± SE over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _mean_curve(curves: list[list[tuple]]) -> tuple[list, list, list]:
    """Mean and standard error per step of several (step, value) curves (steps present in all)."""
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    means, ses = [], []
    for step in steps:
        vals = [v for c in curves for s, v in c if s == step]
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        means.append(m)
        ses.append(sd / math.sqrt(len(vals)))
    return steps, means, ses


def plot_spectrum_curves(runs: list[dict], path: str | Path, title: str = "") -> Path:
    """``drpost spectrum``: test perplexity and training loss against the step, one line per
    (method, frac), mean over seeds with a ± standard error band. The training loss is the general
    batch's (the target batch's for target-only, whose general loss is not trained on)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["frac"]), []).append(r)
    for i, ((method, frac), rs) in enumerate(groups.items()):
        color = _color(method, i)
        numeric = [f for m, f in groups if m == method and isinstance(f, (int, float))]   # 'auto' is dotted
        style = ":" if isinstance(frac, str) else "--" if frac is not None and frac != max(numeric) else "-"
        for ax, curves in (
            (ax1, [[(e["step"], e["ppl"]) for e in r["history"]["eval"] if e.get("ppl") is not None] for r in rs]),
            (ax2, [[(h["step"], h["target_loss" if method == "target_only" else "loss"]) for h in r["history"]["train"]
                    if h.get("target_loss" if method == "target_only" else "loss") is not None] for r in rs]),
        ):
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps, means, ses = _mean_curve(curves)
            ax.plot(steps, means, style, color=color, label=method_label(method, frac))
            ax.fill_between(steps, [m - s for m, s in zip(means, ses)], [m + s for m, s in zip(means, ses)],
                            color=color, alpha=0.15, linewidth=0)
    ax1.set_xlabel("step")
    ax1.set_ylabel("test perplexity")
    ax1.set_title("held-out target perplexity", fontsize=10)
    ppl = [e["ppl"] for r in runs for e in r["history"]["eval"] if e.get("ppl")]
    if ppl and max(ppl) / max(min(ppl), 1e-9) > 20:
        ax1.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("token-mean cross-entropy")
    ax2.set_title("training loss (general batch; target batch for target_only)", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        _integer_x(ax)
    ax1.legend(fontsize=8)
    return _save_seed_figure(plt, fig, path, title)


def plot_curves(metrics: dict, path: str | Path) -> Path:
    """Training loss and test perplexity against the step (matplotlib, Agg backend)."""
    plt = _pyplot()

    train, evals = metrics["history"]["train"], metrics["history"]["eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("loss", "general loss"), ("target_loss", "target loss")):
        pts = [(h["step"], h[key]) for h in train if h.get(key) is not None and math.isfinite(h[key])]
        if pts:
            ax1.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("token-mean cross-entropy")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend()
    pts = [(e["step"], e["ppl"]) for e in evals if e["ppl"] is not None and math.isfinite(e["ppl"])]
    if pts:
        ax2.plot(*zip(*pts), marker="o")
        if max(p for _, p in pts) / max(min(p for _, p in pts), 1e-9) > 20:
            ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("perplexity")
    ax2.set_title(f"test perplexity: {metrics['task']['target']}", fontsize=10)
    ax2.grid(alpha=0.3)
    cfg = metrics.get("config", {})
    fig.suptitle(f"{cfg.get('run_name')}: {cfg.get('drpost', {}).get('feasible_set')} "
                 f"frac={cfg.get('drpost', {}).get('frac')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
