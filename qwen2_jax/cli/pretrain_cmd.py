"""`qwen2-jax pretrain --config configs/X.yaml [--set key=value ...]`: run or resume pretraining."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
  parser = subparsers.add_parser(
      "pretrain", help="pretrain (or resume) a Qwen2 model from a YAML recipe",
      description="Runs the training loop of a recipe in configs/. If output_dir already holds "
                  "checkpoints, the run resumes from the latest committed step (params, "
                  "optimizer, step, RNG and data position).")
  parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe value, e.g. --set steps=50 --set optim.learning_rate=1e-3")
  from qwen2_jax import distributed
  distributed.add_arguments(parser)
  parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
  from qwen2_jax import distributed
  from qwen2_jax.train.pretrain import load_config, pretrain

  distributed.initialize_from_args(args)
  summary = pretrain(load_config(args.config, args.set))
  print(json.dumps(summary, indent=2, default=str))
  return 0
