"""Regenerate ``docs/results.md``: the two-setting SFT experiment of the README.

    ./run.sh --help >/dev/null            # once: creates .venv with everything installed
    .venv/bin/python benchmarks/sft_results.py            # ~75 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/sft_results.py --tables-only   # re-write the docs from finished runs

For each setting (a recipe under ``configs/``) it runs ``drpost spectrum`` with the methods
standard, global, layerwise, rowwise, random and target_only, 3 seeds, frac 0.5, and the shared
overrides below (same step budget and learning rate for every method), into
``runs/results/spectrum-<setting>/``; finished runs are kept (``--resume``), so an interrupted
call continues where it stopped. Then it copies each spectrum's ``summary.md``, ``spectrum.png`` and
``curves.png`` to ``docs/results/<setting>/`` and replaces the generated blocks of
``docs/results.md`` (between ``<!-- BEGIN <setting> -->`` and ``<!-- END <setting> -->``); the
prose around them is written by hand from those numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SETTINGS = {
    "sft_bbc_headline": "configs/sft_bbc_headline.yaml",
    "sft_chatterbot_qa": "configs/sft_chatterbot_qa.yaml",
}
# Shared by every run of both settings: 30 steps (~2-3 s each on 2 CPU cores), perplexity every 10.
OVERRIDES = ["--train.steps", "30", "--train.eval_every", "10",
             "--spectrum.methods", "standard,global,layerwise,rowwise,random,target_only",
             "--spectrum.seeds", "0,1,2", "--spectrum.fracs", "0.5"]


def run_setting(name: str, recipe: str, out: Path, tables_only: bool, progress: bool) -> dict:
    from drpost.config import load_config
    from drpost.recipes.spectrum import run_spectrum

    cfg = load_config(ROOT / recipe, OVERRIDES + ["--output_dir", str(out), "--run_name", f"spectrum-{name}"])
    spectrum_dir = cfg.run_dir
    if tables_only:
        if not (spectrum_dir / "spectrum.json").is_file():
            raise SystemExit(f"{spectrum_dir}/spectrum.json is missing: run without --tables-only first")
    else:
        resume = spectrum_dir.is_dir() and any(spectrum_dir.iterdir())
        run_spectrum(cfg, resume=resume, progress=progress)
    return json.loads((spectrum_dir / "spectrum.json").read_text())


def write_docs(results: dict[str, dict], docs: Path) -> None:
    page = docs / "results.md"
    text = page.read_text() if page.is_file() else "# Results\n"
    for name, res in results.items():
        target = docs / "results" / name
        target.mkdir(parents=True, exist_ok=True)
        src = Path(res["spectrum_dir"])
        for f in ("summary.md", "spectrum.png", "curves.png", "summary.csv", "runs.csv"):
            shutil.copy(src / f, target / f)
        block = (f"<!-- BEGIN {name} -->\n"
                 f"{res['table']}\n\n"
                 f"![{name}: metric and perplexity vs kept share](results/{name}/spectrum.png)\n"
                 f"![{name}: curves](results/{name}/curves.png)\n\n"
                 f"Per-run numbers: [runs.csv](results/{name}/runs.csv); {len(res['runs'])} runs, "
                 f"{res.get('seconds_total', 0) / 60:.0f} min of this call.\n"
                 f"<!-- END {name} -->")
        pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    page.write_text(text)
    print(f"wrote {page} ({', '.join(results)}); machine: {platform.machine()} {os.cpu_count()} CPUs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "results"), help="where the spectrum directories go")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ", ".join(SETTINGS))
    p.add_argument("--tables-only", action="store_true", help="only re-write the docs from finished spectra")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    results = {n: run_setting(n, SETTINGS[n], Path(args.out), args.tables_only, not args.no_progress) for n in names}
    write_docs(results, ROOT / "docs")


if __name__ == "__main__":
    main()
