"""`qwen2-jax dpo --config configs/X.yaml [--set key=value ...]`: run or resume DPO."""

from __future__ import annotations

from qwen2_jax.cli.recipe import add_recipe_command


def register(subparsers) -> None:
  add_recipe_command(
      subparsers, "dpo", help="offline DPO on preference JSONL (prompt, chosen, rejected)",
      description=("Runs offline DPO from a YAML recipe (configs/dpo_qwen2-report.yaml). "
                   "Data: JSONL lines {'prompt' or 'messages', 'chosen', 'rejected'}; reference "
                   "log-probs on the fly or precomputed once (reference: precomputed). If "
                   "output_dir already holds checkpoints, the run resumes from the latest "
                   "committed step."),
      example="--set steps=50 --set data.seq_len=4096",
      job="qwen2_jax.train.dpo:DPOJob")
