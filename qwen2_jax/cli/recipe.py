"""The parser and runner shared by the recipe-driven training commands (pretrain, sft, dpo, rm,
grpo).

Each takes `--config RECIPE.yaml`, any number of `--set key=value` overrides and the
multi-host arguments (`qwen2_jax.distributed`); it builds the job's recipe dataclass from them
(typed and strict: a bad setting is a one-line error naming it and its file:line or `--set`),
runs the job on `qwen2_jax.train.runner`, and prints the run summary as JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json


def add_recipe_command(subparsers, name: str, *, help: str, description: str, example: str,
                       job: str) -> argparse.ArgumentParser:
  """Adds subcommand `name`, which runs `job` ("module:JobClass", imported only when the command
  runs, so `--help` stays fast) on the recipe of `--config` and `--set`."""
  # In-function imports here and in `_run`: they pull in jax, which would slow down `--help`.
  from qwen2_jax import distributed  # pylint: disable=import-outside-toplevel

  parser = subparsers.add_parser(name, help=help, description=description)
  parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help=f"override a recipe value, e.g. {example}")
  distributed.add_arguments(parser)
  parser.set_defaults(func=functools.partial(_run, job))
  return parser


def _run(job: str, args: argparse.Namespace) -> int:
  from qwen2_jax import distributed  # pylint: disable=import-outside-toplevel
  from qwen2_jax.train import runner  # pylint: disable=import-outside-toplevel

  distributed.initialize_from_args(args)
  module, cls = job.split(":")
  job_class = getattr(importlib.import_module(module), cls)
  cfg = job_class.config.load(args.config, args.set)
  # A recipe may pick a variant of the job (dpo with `online:` is online DPO).
  job = job_class.for_config(cfg) if hasattr(job_class, "for_config") else job_class(cfg)
  summary = runner.run(job)
  print(json.dumps(summary, indent=2, default=str))
  return 0
