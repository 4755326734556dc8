"""The parser and runner shared by the recipe-driven training commands (pretrain, sft, dpo).

Each takes `--config RECIPE.yaml`, any number of `--set key=value` overrides and the
multi-host arguments (`qwen2_jax.distributed`); it loads the recipe with its module's
`load_config`, runs it, and prints the run summary as JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json


def add_recipe_command(subparsers, name: str, *, help: str, description: str, example: str,
                       module: str, run: str) -> argparse.ArgumentParser:
  """Adds subcommand `name`: `module.run(module.load_config(--config, --set))` (imported only
  when the command runs, so `--help` stays fast)."""
  from qwen2_jax import distributed

  parser = subparsers.add_parser(name, help=help, description=description)
  parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help=f"override a recipe value, e.g. {example}")
  distributed.add_arguments(parser)
  parser.set_defaults(func=functools.partial(_run, module, run))
  return parser


def _run(module: str, run: str, args: argparse.Namespace) -> int:
  from qwen2_jax import distributed

  distributed.initialize_from_args(args)
  job = importlib.import_module(module)
  summary = getattr(job, run)(job.load_config(args.config, args.set))
  print(json.dumps(summary, indent=2, default=str))
  return 0
