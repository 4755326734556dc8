"""`qwen2-jax rm --config configs/X.yaml [--set key=value ...]`: train or resume a reward model."""

from __future__ import annotations

from qwen2_jax.cli.recipe import add_recipe_command


def register(subparsers) -> None:
  add_recipe_command(
      subparsers, "rm", help="reward model (Bradley-Terry) on preference JSONL",
      description=("Trains a reward model (Qwen2 backbone + scalar head, exported as HF "
                   "Qwen2ForSequenceClassification) from a YAML recipe "
                   "(configs/rm_cpu_demo.yaml) on DPO-format preference pairs: JSONL lines "
                   "{'prompt' or 'messages', 'chosen', 'rejected'}. init_from: a causal LM (its "
                   "lm_head is dropped) or a reward model. If output_dir already holds "
                   "checkpoints, the run resumes from the latest committed step."),
      example="--set steps=50 --set score_init_std=0.0",
      job="qwen2_jax.train.rm:RMJob")
