"""`qwen2-jax sft --config configs/X.yaml [--set key=value ...]`: run or resume SFT."""

from __future__ import annotations

from qwen2_jax.cli.recipe import add_recipe_command


def register(subparsers) -> None:
  add_recipe_command(
      subparsers, "sft", help="supervised fine-tuning on chat JSONL (assistant tokens only)",
      description=("Runs SFT from a YAML recipe (configs/sft_qwen2-report.yaml is Qwen2's). "
                   "Data: JSONL lines {'messages': [...]} rendered as ChatML; the loss is on "
                   "assistant tokens only. If output_dir already holds checkpoints, the run "
                   "resumes from the latest committed step."),
      example="--set steps=50 --set data.seq_len=4096",
      job="qwen2_jax.train.sft:SFTJob")
