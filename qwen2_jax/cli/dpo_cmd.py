"""`qwen2-jax dpo --config configs/X.yaml [--set key=value ...]`: run or resume DPO."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
  parser = subparsers.add_parser(
      "dpo", help="offline DPO on preference JSONL (prompt, chosen, rejected)",
      description=("Runs offline DPO from a YAML recipe (configs/dpo_qwen2-report.yaml). "
                   "Data: JSONL lines {'prompt' or 'messages', 'chosen', 'rejected'}; reference "
                   "log-probs on the fly or precomputed once (reference: precomputed). If "
                   "output_dir already holds checkpoints, the run resumes from the latest "
                   "committed step."))
  parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe value, e.g. --set steps=50 --set data.seq_len=4096")
  from qwen2_jax import distributed
  distributed.add_arguments(parser)
  parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
  from qwen2_jax import distributed
  from qwen2_jax.train.dpo import dpo, load_config

  distributed.initialize_from_args(args)
  summary = dpo(load_config(args.config, args.set))
  print(json.dumps(summary, indent=2, default=str))
  return 0
