"""`qwen2-jax sft --config configs/X.yaml [--set key=value ...]`: run or resume SFT."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
  parser = subparsers.add_parser(
      "sft", help="supervised fine-tuning on chat JSONL (assistant tokens only)",
      description=("Runs SFT from a YAML recipe (configs/sft_qwen2-report.yaml is Qwen2's). "
                   "Data: JSONL lines {'messages': [...]} rendered as ChatML; the loss is on "
                   "assistant tokens only. If output_dir already holds checkpoints, the run "
                   "resumes from the latest committed step."))
  parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe value, e.g. --set steps=50 --set data.seq_len=4096")
  from qwen2_jax import distributed
  distributed.add_arguments(parser)
  parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
  from qwen2_jax import distributed
  from qwen2_jax.train.sft import sft, load_config

  distributed.initialize_from_args(args)
  summary = sft(load_config(args.config, args.set))
  print(json.dumps(summary, indent=2, default=str))
  return 0
