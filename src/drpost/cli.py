"""The ``drpost`` command line."""

from __future__ import annotations

import argparse
import os
import sys

# Never reach for the Hugging Face hub: everything drpost needs is local.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def _demo(args: argparse.Namespace) -> int:
    from drpost.demo import config_from_args, run_demo

    run_demo(config_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from drpost.demo import add_demo_arguments

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
