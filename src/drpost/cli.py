"""The ``drpost`` command line."""

from __future__ import annotations

import argparse
import os
import sys

# Never reach for the Hugging Face hub: everything drpost needs is local.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def _demo(args: argparse.Namespace) -> int:
    from drpost.recipes.demo import config_from_args, run_demo

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc < 1:
        print(f"drpost demo: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if args.nproc > 1 and world == 1:
        return _torchrun(args.nproc, args.argv)
    if world > 1 and args.nproc not in (1, world):
        print(f"drpost demo: error: --nproc {args.nproc} but torchrun started {world} processes", file=sys.stderr)
        return 2
    run_demo(config_from_args(args))
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run this very command again under ``torchrun --standalone`` with ``nproc`` processes on this machine
    (for several machines call torchrun yourself: see the README)."""
    import subprocess

    rest, i = [], 0
    while i < len(argv):  # drop --nproc (torchrun's own parser would take it for --nproc-per-node)
        if argv[i] == "--nproc":
            i += 2
            continue
        if not argv[i].startswith("--nproc="):
            rest.append(argv[i])
        i += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "drpost.cli", *rest]
    print("drpost: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


_TRAIN_FLAGS = {"--resume": "resume", "--overwrite": "overwrite", "--no-progress": "no_progress"}
_EVAL_FLAGS = {"--no-progress": "no_progress"}
_EVAL_OPTIONS = ("--checkpoint", "--output")


def _split_flags(rest: list[str], flags: dict, options: tuple = ()) -> tuple[dict, dict, list[str]]:
    """Pull drpost's own flags (``--resume``) and options (``--checkpoint X``) out of the override list."""
    found = {name: False for name in flags.values()}
    values, overrides, i = {}, [], 0
    while i < len(rest):
        tok = rest[i]
        key = tok.split("=", 1)[0]
        if tok in flags:
            found[flags[tok]] = True
        elif key in options:
            if "=" in tok:
                values[key[2:]] = tok.split("=", 1)[1]
            elif i + 1 < len(rest):
                values[key[2:]] = rest[i + 1]
                i += 1
            else:
                raise SystemExit(f"drpost: error: {key} needs a value")
        else:
            overrides.append(tok)
        i += 1
    return found, values, overrides


def _setup_logging() -> None:
    import logging

    log = logging.getLogger("drpost")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # a root handler (set up by a library) would print every line twice


def _train(args: argparse.Namespace) -> int:
    from drpost.config import load_config
    from drpost.recipes.sft import run_sft

    flags, _, overrides = _split_flags(args.rest, _TRAIN_FLAGS)
    _setup_logging()
    cfg = load_config(args.config, overrides)
    if cfg.recipe == "rl":
        from drpost.recipes.rl import run_rl

        run_rl(cfg, overwrite=flags["overwrite"], progress=not flags["no_progress"], resume=flags["resume"])
        return 0
    run_sft(cfg, resume=flags["resume"], overwrite=flags["overwrite"], progress=not flags["no_progress"])
    return 0


def _spectrum(args: argparse.Namespace) -> int:
    from drpost.config import load_config
    from drpost.recipes.spectrum import run_spectrum

    flags, _, overrides = _split_flags(args.rest, _TRAIN_FLAGS)
    _setup_logging()
    cfg = load_config(args.config, overrides)
    if cfg.recipe != "sft":
        raise ValueError(f"drpost spectrum runs SFT recipes; {args.config} is a recipe: {cfg.recipe} config "
                         "(RL comparisons: benchmarks/rl_results.py)")
    if not any(o.lstrip("-").split("=")[0] == "run_name" for o in overrides) and cfg.run_name:
        cfg.run_name = f"spectrum-{cfg.run_name}"  # never the run directory of `drpost train CONFIG`
    run_spectrum(cfg, resume=flags["resume"], overwrite=flags["overwrite"], progress=not flags["no_progress"])
    return 0


def _bench(args: argparse.Namespace) -> int:
    from drpost.bench import bench_config_from_arguments, format_report, run_bench, write_report

    report = run_bench(bench_config_from_arguments(args), progress=not args.no_progress)
    md, js = write_report(report, args.out)
    print("\n" + format_report(report) + f"\n\nwritten: {md}, {js}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from drpost.recipes.evaluate import evaluate_run

    flags, values, overrides = _split_flags(args.rest, _EVAL_FLAGS, _EVAL_OPTIONS)
    _setup_logging()
    res = evaluate_run(args.run_dir, checkpoint=values.get("checkpoint"), overrides=overrides,
                       progress=not flags["no_progress"], output=values.get("output"))
    shown = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print("eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    print(f"checkpoint: {res['checkpoint']}\nwritten: {res['path']}")
    return 0


_TRAIN_EPILOG = """\
overrides (any number, after CONFIG):
  --section.key value | --section.key=value | --key value (a key found in one section only)
  e.g. --train.steps 20 --drpost.feasible_set standard --frac 0.25 --data.target.sections tech
  --drpost.frac auto chooses frac online (drpost.auto_fracs, auto_every, auto_holdout; sft only)
  sections: model, data, drpost, train, eval, spectrum, rl; top level: output_dir, run_name, recipe
flags:
  --resume      continue the run directory's last checkpoint (needs train.save_steps > 0)
  --overwrite   replace an existing run directory
  --no-progress no progress bars
CONFIG may also be a run directory (its config.yaml), e.g. to resume it.
The run directory <output_dir>/<run_name> (run_name defaults to the config file's stem) gets
config.yaml, metrics.json, train_log.jsonl, predictions.json, curves.png, tensorboard/,
checkpoint-N/ and final/.
"""

_SPECTRUM_EPILOG = """\
Trains the recipe once per point of the grid spectrum.methods x spectrum.fracs x spectrum.seeds
(standard and target_only once per seed: they have no frac; 'auto' among spectrum.fracs is a
run with drpost.frac: auto, placed at the mean frac it used), with everything else shared, then
writes a results table (mean +- standard error over seeds, paired differences to standard) and
plots to <output_dir>/spectrum-<run_name>/: summary.md, summary.csv, runs.csv, spectrum.json,
spectrum.png (metric and perplexity vs kept share), curves.png (per-step curves), runs/<point>/.
overrides (after CONFIG), as for drpost train, e.g.
  --spectrum.methods standard,layerwise,random --spectrum.seeds 0,1,2 --spectrum.fracs 0.25,0.5
  --train.steps 30 --eval.n_test 50
flags:
  --resume      keep the finished runs of an interrupted spectrum and do the rest
  --overwrite   replace an existing spectrum directory
  --no-progress no progress bars
"""

_EVAL_EPILOG = """\
drpost eval options (after RUN_DIR):
  --checkpoint NAME|PATH  a checkpoint-N folder of the run (default: final/, else the last checkpoint)
  --output PATH           where to write the results (default: RUN_DIR/eval.json)
  --eval.KEY VALUE        change evaluation settings (eval.n_test, eval.metrics, eval.max_new_tokens, ...)
  --no-progress           no progress bars
"""


def _add_recipe_command(sub, name: str, func, epilog: str, help: str, description: str, config_help: str) -> None:
    """A sub-command taking a recipe CONFIG followed by --section.key overrides and drpost's flags."""
    p = sub.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog, allow_abbrev=False,
        usage=f"drpost {name} CONFIG [--section.key value ...] [--resume] [--overwrite] [--no-progress]")
    p.add_argument("config", help=config_help)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from drpost.recipes.demo import add_demo_arguments

    parser = argparse.ArgumentParser(
        prog="drpost", description="Data-regularized LLM post-training (Dr. Post-Training)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="minimal end-to-end SFT run: standard vs layerwise vs target-only on SmolLM2-135M",
        description="Fine-tune the embedded SmolLM2-135M-Instruct on BBC tech headlines "
        "(16 target examples) with a general data pool, comparing feasible sets; prints a "
        "perplexity table and writes <out>/demo-<timestamp>/metrics.json.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    _add_recipe_command(sub, "train", _train, _TRAIN_EPILOG,
                        help="train one recipe: drpost train CONFIG [--section.key value ...] [--resume]",
                        description="Supervised fine-tuning with Dr. Post-Training from a YAML recipe (configs/*.yaml).",
                        config_help="a YAML recipe, or a run directory (its config.yaml)")
    _add_recipe_command(sub, "spectrum", _spectrum, _SPECTRUM_EPILOG,
                        help="compare feasible sets over seeds and fracs: drpost spectrum CONFIG "
                        "[--spectrum.seeds 0,1,2]",
                        description="Run a recipe for every feasible set x frac x seed and tabulate/plot the results.",
                        config_help="a YAML recipe (configs/*.yaml)")

    bench = sub.add_parser(
        "bench", help="time a drpost step against a plain step (ratios, breakdown, peak memory)",
        description="Time plain and drpost training steps, alternated in one process, for every feasible set x "
        "scoring back-end and the naive alternatives; write a Markdown table and JSON (see drpost.bench).")
    from drpost.bench import add_bench_arguments   # generated from BenchConfig's fields

    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    ev = sub.add_parser(
        "eval", help="re-evaluate a trained run: drpost eval RUN_DIR [--checkpoint NAME]",
        description="Reload a run's final model (or a checkpoint), rebuild its test split from its config.yaml, "
        "and write perplexity + generation metrics to RUN_DIR/eval.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EVAL_EPILOG, allow_abbrev=False,
        usage="drpost eval RUN_DIR [--checkpoint NAME] [--output PATH] [--eval.key value ...] [--no-progress]")
    ev.add_argument("run_dir", help="a run directory written by drpost train")
    ev.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in ("train", "eval", "spectrum", "bench") and not os.environ.get("DRPOST_DEBUG"):
        try:
            return args.func(args)
        except Exception as err:  # known user errors: one clear line instead of a traceback
            if not _is_user_error(err):
                raise
            print(f"drpost {args.command}: error: {err}", file=sys.stderr)
            return 2
    return args.func(args)


def _is_user_error(err: Exception) -> bool:
    from drpost.config import ConfigError
    from drpost.data.sources import BadRowError
    from drpost.models import ModelNotAvailableError
    from drpost.checkpoint import CheckpointError
    from drpost.distributed import DistributedFaultError
    from drpost.engine import NonFiniteError
    from drpost.recipes.sft import DiskFullError, RunDirError

    if isinstance(err, (ConfigError, BadRowError, ModelNotAvailableError, RunDirError, DiskFullError,
                        FileNotFoundError, CheckpointError, DistributedFaultError, NonFiniteError)):
        return True
    # ValueErrors raised by drpost's own checks (data splits, trainer arguments) name what to fix;
    # one raised deeper (torch, transformers) keeps its traceback.
    return isinstance(err, ValueError) and _origin_module(err).startswith("drpost")


def _origin_module(err: Exception) -> str:
    """Module of the frame that raised ``err``."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""


if __name__ == "__main__":
    sys.exit(main())
