"""`qwen2-jax pretrain --config configs/X.yaml [--set key=value ...]`: run or resume pretraining."""

from __future__ import annotations

from qwen2_jax.cli.recipe import add_recipe_command


def register(subparsers) -> None:
  add_recipe_command(
      subparsers, "pretrain", help="pretrain (or resume) a Qwen2 model from a YAML recipe",
      description="Runs the training loop of a recipe in configs/. If output_dir already holds "
                  "checkpoints, the run resumes from the latest committed step (params, "
                  "optimizer, step and data position).",
      example="--set steps=50 --set optim.learning_rate=1e-3",
      job="qwen2_jax.train.pretrain:PretrainJob")
