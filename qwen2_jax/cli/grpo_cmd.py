"""`qwen2-jax grpo --config configs/X.yaml [--set key=value ...]`: run or resume GRPO."""

from __future__ import annotations

from qwen2_jax.cli.recipe import add_recipe_command


def register(subparsers) -> None:
  add_recipe_command(
      subparsers, "grpo", help="online RL with GRPO: engine rollouts, rule / model rewards",
      description=("Runs GRPO from a YAML recipe (configs/grpo_cpu_demo.yaml): each round "
                   "samples rollout.num_generations responses per prompt with the generation "
                   "engine from the current policy (in memory, same process), scores them with "
                   "the recipe's rewards (math, code, function, reward_model), normalises the "
                   "rewards within each prompt's group and takes clipped policy-gradient steps "
                   "with a KL penalty to the reference. Data: JSONL lines {'prompt' or "
                   "'messages', plus metadata such as 'answer' or 'tests'}. If output_dir "
                   "already holds checkpoints, the run resumes from the latest committed "
                   "round."),
      example="--set steps=50 --set rollout.num_generations=16",
      job="qwen2_jax.train.grpo:GRPOJob")
