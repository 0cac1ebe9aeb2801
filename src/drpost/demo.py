"""``drpost demo`` lives in :mod:`drpost.recipes.demo` (a recipe trained by ``run_sft``); this module
keeps the old import path."""

from drpost.recipes.demo import (KNOWN_METHODS, METHODS, DemoConfig, add_demo_arguments, check_config,
                                 config_from_args, run_demo)
from drpost.recipes.demo_report import verdict

__all__ = ["DemoConfig", "run_demo", "add_demo_arguments", "config_from_args", "check_config", "verdict",
           "METHODS", "KNOWN_METHODS"]
