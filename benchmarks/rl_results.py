"""Regenerate docs/results_rl.md (RLVR: GRPO plain vs drpost filter (layer / global) vs IIF;
RLHF: reward model + RLOO plain vs drpost filter vs IIF; issue 15 item 5: GRPO and PPO, standard vs
filter vs IIF, on the balanced section task) with one command:

    nice -n 19 python benchmarks/rl_results.py                 # every run, then the report
    python benchmarks/rl_results.py --part grpo_balanced       # one setting (runs can go in parallel)
    python benchmarks/rl_results.py --report-only              # rebuild the report from results/rl

GRPO runs on the recipe's TRL-based trainer (``drpost.integrations.trl_grpo.DrPostGRPOTrainer``),
RLOO and PPO on drpost's own loops (:mod:`drpost.recipes.rl`). Runs are seed-major (every method of
seed 0, then seed 1, ...), skipped when their metrics.json exists, so an interrupted sweep continues
where it stopped. Sizes are the recipe files' (configs/rlvr_bbc_category.yaml,
configs/rlhf_bbc_headline.yaml) with the overrides below.

The balanced settings (``--rl.balanced true``: every split has the five sections in equal shares, so a
constant answer scores 1/5 on the test split) are the ones that can separate the methods; each method is
compared with ``standard`` by a paired t-test over the seeds (:func:`drpost.stats.paired`), with a verdict
only at p < 0.05 (:func:`drpost.stats.verdict`; otherwise "no difference shown"). ``--report-only``
works with any subset of the runs (none, some seeds, some methods).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from commit_results import commit_results  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

METHODS = {
    "standard": ["--drpost.feasible_set", "standard"],
    "filter_layer": ["--drpost.feasible_set", "filter", "--drpost.scope", "layer"],
    "filter_global": ["--drpost.feasible_set", "filter", "--drpost.scope", "global"],
    "iif": ["--drpost.feasible_set", "standard", "--rl.iif", "true"],
}
SETTINGS = {
    "rlvr": {"config": "configs/rlvr_bbc_category.yaml", "methods": ["standard", "filter_layer", "filter_global", "iif"],
             "overrides": ["--train.steps", "8", "--rl.n_test", "60"], "title": "RLVR: GRPO on BBC section names"},
    "rlhf": {"config": "configs/rlhf_bbc_headline.yaml", "methods": ["standard", "filter_layer", "iif"],
             "overrides": ["--train.steps", "6", "--rl.n_test", "30", "--rl.prompts_per_step", "3",
                           "--rl.max_new_tokens", "10"],
             "title": "RLHF: reward model + RLOO on BBC headlines"},
}
# issue 15 item 5: the balanced section task (a constant answer scores 1/5), GRPO (TRL-based) and PPO.
# Sized for ~1.5 h of this 2-core CPU with two sweeps in parallel (one thread each): measured there, one step
# of 4 prompts x 4 completions plus 2 target prompts x 4 takes ~26 s (GRPO) / ~38 s (PPO: the critic's
# forward and backward on top), an evaluation of the 60 test prompts ~25 s; so a 16-step run is ~7.5 min
# (GRPO) / ~10.5 min (PPO) and the 18 runs ~2.7 h of one thread. beta 0 (TRL's default): no reference
# forward, the clipped policy loss alone.
BALANCED = ["--rl.balanced", "true", "--train.steps", "16", "--rl.n_test", "60", "--rl.n_target", "20",
            "--rl.prompts_per_step", "4", "--rl.group_size", "4", "--rl.target_batch", "2", "--rl.beta", "0",
            "--rl.micro_batch", "8", "--train.lr", "5e-4", "--train.eval_every", "0"]
SETTINGS.update({
    "grpo_balanced": {"config": "configs/rlvr_bbc_category.yaml", "methods": ["standard", "filter_layer", "iif"],
                      "overrides": BALANCED + ["--rl.algorithm", "grpo"],
                      "title": "GRPO (TRL GRPOTrainer) on balanced BBC sections"},
    "ppo_balanced": {"config": "configs/rlvr_bbc_category.yaml", "methods": ["standard", "filter_layer", "iif"],
                     "overrides": BALANCED + ["--rl.algorithm", "ppo"],
                     "title": "PPO (critic + GAE) on balanced BBC sections"},
})
DEFAULT_SEEDS = {"rlvr": [0, 1, 2], "rlhf": [0], "grpo_balanced": [0, 1, 2], "ppo_balanced": [0, 1, 2]}


def run_dir(out: Path, part: str, method: str, seed: int) -> Path:
    return out / part / f"{method}-s{seed}"


def run_all(out: Path, part: str, seeds: list[int], threads: int, methods: list[str] | None = None,
            commit: bool = False) -> None:
    from drpost.config import load_config
    from drpost.recipes.rl import run_rl

    s = SETTINGS[part]
    for seed in seeds:
        for method in s["methods"]:
            d = run_dir(out, part, method, seed)
            if (d / "metrics.json").is_file():
                print(f"[skip] {d} exists", flush=True)
                continue
            if methods and method not in methods:
                continue
            claims = out / part / ".claims"
            claims.mkdir(parents=True, exist_ok=True)
            try:   # several sweeps may run in parallel: each run is claimed by exactly one
                os.close(os.open(claims / d.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                print(f"[skip] {d} claimed by another sweep (delete {claims / d.name} if it died)", flush=True)
                continue
            first = seed == seeds[0] and method == s["methods"][0]
            ov = s["overrides"] + METHODS[method] + [
                "--train.seed", str(seed), "--output_dir", str(out / part), "--run_name", d.name,
                "--eval.at_start", "true" if first else "false", "--train.save_final", "false",
                "--train.threads", str(threads)]
            if part == "rlhf":
                ov += ["--rl.reward_model_path", str(out / part / "reward_model.pt")]
            cfg = load_config(ROOT / s["config"], ov)
            t0 = time.time()
            run_rl(cfg, overwrite=True, progress=False)
            print(f"[done] {part} {method} seed {seed} in {time.time() - t0:.0f} s", flush=True)
            if commit:
                commit_results(ROOT, str(out.relative_to(ROOT)),
                               f"results: rl {part} {method} seed {seed} (benchmarks/rl_results.py)")


def _mean_se(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    m = sum(xs) / len(xs)
    se = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return m, se, len(xs)


def _fmt(m, se, digits=3):
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" + (f" ± {se:.{digits}f}" if not math.isnan(se) else "")


def _top_prediction(run: dict) -> tuple[str, float] | None:
    """The most frequent final test prediction and its share (a collapse diagnostic)."""
    f = Path(run["_dir"]) / "predictions.json"   # where metrics.json was read (run_dir may be another clone's)
    if not f.is_file():
        return None
    preds = [p["prediction"] for p in json.loads(f.read_text())]
    best = max(set(preds), key=preds.count)
    return best, preds.count(best) / len(preds)


def paired_lines(runs: dict, methods: list[str], metric: str) -> list[str]:
    """Every method against ``standard``: the paired difference of the final metric over the seeds both
    have, its SE, the paired t-test's p-value, and a verdict only at p < 0.05."""
    from drpost.stats import paired, verdict

    base = {r["config"]["train"]["seed"]: r["final"][metric] for r in runs.get("standard", [])}
    rows = []
    for method in methods:
        if method == "standard" or not runs.get(method) or not base:
            continue
        test = paired({r["config"]["train"]["seed"]: r["final"][metric] for r in runs[method]}, base)
        if not test.n:
            continue
        fmt = lambda x, d=3: "n/a" if x is None else f"{x:+.{d}f}"  # noqa: E731
        p = "n/a" if test.p is None else f"{test.p:.3g}"
        rows.append(f"| {method} - standard | {test.n} | {fmt(test.mean)} | "
                    f"{'n/a' if test.se is None else f'{test.se:.3f}'} | {p} | {verdict(test, lower_is_better=False)} |")
    if not rows:
        return []
    return ["", f"Paired differences of the final {metric} (same seeds; paired t-test, verdict only at p < 0.05):", "",
            "| comparison | seeds | mean difference | SE | p | verdict |", "|---|---|---|---|---|---|", *rows]


def report(out: Path, doc: Path) -> None:
    lines = ["# Reinforcement learning results (issues 6 and 15)", "",
             "Generated by `nice -n 19 python benchmarks/rl_results.py` (runs under `results/rl/`, committed as they finish; "
             "`--report-only` rebuilds this file). SmolLM2-135M-Instruct + LoRA (r 8 on q/k/v/o), CPU, "
             "bf16 autocast. Every number below is measured by the runs listed; nothing is copied from the paper.", ""]
    data = {}
    for part, s in SETTINGS.items():
        runs = {}
        for method in s["methods"]:
            for d in sorted((out / part).glob(f"{method}-s*")):
                f = d / "metrics.json"
                if f.is_file():
                    runs.setdefault(method, []).append({**json.loads(f.read_text()), "_dir": str(d)})
        if not runs:
            continue
        data[part] = runs
        any_run = next(iter(runs.values()))[0]
        metric = any_run["metric"]
        cfg = any_run["config"]
        rl, tr = cfg["rl"], cfg["train"]
        start = next((r["start"][metric] for rs in runs.values() for r in rs if r.get("start")), None)
        lines += [f"## {s['title']}", "",
                  f"Task `{rl['task']}` ({any_run['task']['train']} training prompts, target pool "
                  f"{any_run['task']['target']}, {any_run['task']['test']} held-out test prompts, greedy decoding), "
                  f"{any_run['algorithm'].upper()}, {tr['steps']} steps x {rl['prompts_per_step']} prompts x "
                  f"{rl['group_size']} completions (<= {rl['max_new_tokens']} new tokens), lr {tr['lr']}, beta "
                  f"{rl['beta']}, target {rl['target_source']}/{rl['target_loss']} ({rl['target_batch']} target "
                  f"prompts x {rl['group_size']} per step), micro-batch {rl['micro_batch']}.",
                  f"Metric: held-out **{metric}** ({'exact match of the section name' if metric == 'accuracy' else 'ROUGE-L F1 of the generated headline vs the real one; the reward model is never used for evaluation'}). "
                  f"Step 0 (the untrained model, same for every method): {start if start is None else f'{start:.3f}'}.",
                  ""]
        if any_run.get("reward_model"):
            rm = any_run["reward_model"]
            lines += [f"Reward model: SmolLM2 + scalar head, LoRA r {rl['rm_lora_r']}, Bradley-Terry, "
                      f"{rm['pairs_train']} pairs x {rl['rm_epochs']} epochs; held-out pair accuracy "
                      f"{rm['held_out_accuracy_before']:.3f} -> {rm['held_out_accuracy']:.3f} "
                      f"({rm['pairs_held_out']} pairs).", ""]
        lines += [f"| method | seeds | final {metric} (mean ± SE) | per seed | mean train reward | mean kept | "
                  "mean KL | s/step | most common final prediction (share) |", "|---|---|---|---|---|---|---|---|---|"]
        for method in s["methods"]:
            rs = runs.get(method, [])
            if not rs:
                continue
            fin = [r["final"][metric] for r in rs]
            tops = [t for t in (_top_prediction(r) for r in rs) if t]
            top = ", ".join(f"{t[0][:24]!r} ({t[1]:.2f})" for t in tops)
            m, se, n = _mean_se(fin)
            tm = lambda k: _mean_se([r["train_means"].get(k) for r in rs])  # noqa: E731
            lines.append(f"| {method} | {n} | {_fmt(m, se)} | {', '.join(f'{x:.3f}' for x in fin)} | "
                         f"{_fmt(*tm('reward')[:2])} | {_fmt(*tm('kept')[:2])} | {_fmt(*tm('kl')[:2], digits=4)} | "
                         f"{tm('seconds')[0]:.0f} | {top} |")
        lines += paired_lines(runs, s["methods"], metric)
        if start is not None:
            ch = [f"{m_}: {_mean_se([r['final'][metric] for r in runs[m_]])[0] - start:+.3f}"
                  for m_ in s["methods"] if runs.get(m_)]
            lines += ["", f"Change of the mean final {metric} from step 0: " + ", ".join(ch) + "."]
        total = sum(r["seconds_total"] for rs in runs.values() for r in rs)
        lines += ["", f"Wall time of these {sum(len(rs) for rs in runs.values())} runs: {total / 60:.0f} min "
                  "(niced, on a 2-core machine shared with other jobs; per-run times in each metrics.json)."]
        steps = max((len(r["history"]["train"]) for rs in runs.values() for r in rs), default=0)
        lines += ["", "Kept fraction of the completions per step (mean over seeds; per-layer sets: mean over layers):",
                  "", "| method | " + " | ".join(str(i + 1) for i in range(steps)) + " |",
                  "|---|" + "---|" * steps]
        for method in s["methods"]:
            rs = runs.get(method, [])
            if not rs:
                continue
            cells = []
            for i in range(steps):
                v = [r["history"]["train"][i]["kept"] for r in rs if len(r["history"]["train"]) > i]
                cells.append(f"{sum(v) / len(v):.2f}" if v else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## How to read this", "",
              "* RLVR at this size collapses: every method ends up answering 'business' (the most common section)",
              "  for most test articles (last column), and the accuracy gain over step 0 comes from the answer",
              "  format ('business' instead of 'Business'/'Business: ...'), not from classification. All methods",
              "  reach the same 16/60; the setting does not separate them. Longer runs, larger groups and a reward",
              "  that is not dominated by one class would be needed; this CPU budget did not allow them.",
              "* The balanced settings (issue 15) give every split the five sections in equal shares: a policy",
              "  collapsed on one answer scores 0.200, so an accuracy above it needs classification.",
              "* Runs are tiny (a few steps of 16 completions on a 135M model, CPU), so differences of a few",
              "  test items (1/60 = 0.017 accuracy) are within seed noise; SE is over seeds (n shown).",
              "* `kept` is the share of completions whose gradient entered the update: drpost filter per",
              "  micro-batch (per layer: averaged over layers), IIF once per rollout. Completions of a group whose",
              "  rewards are all equal have advantage 0, so their gradient is the KL term only and their score is",
              "  small with either sign (exactly 0 at step 1, where the policy is the reference): the filter drops",
              "  about half of them. Dropping them also removes their tokens from the token-mean denominator",
              "  (METHOD §1.6), so the informative completions get a larger effective step than in plain GRPO/RLOO,",
              "  where zero-advantage tokens dilute the mean. Part of any difference can come from this reweighting.",
              "* Train reward, KL and kept are means over all steps and over the *whole* rollout for every",
              "  method, IIF included (METHOD §9.7: the reference code reported IIF's reward on the kept subset).",
              "* The RLHF evaluation never uses the reward model: ROUGE-L against the real headline of held-out",
              "  articles is an independent scorer; the reward model's own held-out pair accuracy is reported above.",
              ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
    (doc.parent / "results_rl").mkdir(exist_ok=True)
    summary = {part: {m: [{"seed": r["config"]["train"]["seed"], "final": r["final"], "train_means": r["train_means"],
                           "start": r["start"]} for r in rs] for m, rs in runs.items()} for part, runs in data.items()}
    (doc.parent / "results_rl" / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {doc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", *SETTINGS], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="default: 0 1 2 (rlvr, grpo_balanced, ppo_balanced), 0 (rlhf)")
    ap.add_argument("--out", default=str(ROOT / "results" / "rl"))
    ap.add_argument("--commit", action="store_true", help="git-commit the output folder every time a run finishes")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results_rl.md"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all of the setting)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        for part in (list(SETTINGS) if args.part == "all" else [args.part]):
            run_all(out, part, args.seeds or DEFAULT_SEEDS[part], args.threads, args.methods, args.commit)
    report(out, Path(args.doc))


if __name__ == "__main__":
    main()
