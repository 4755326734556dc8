"""Supervised fine-tuning on chat data (`qwen2-jax sft --config ...`), as in the Qwen2 report.

The step is pretraining's (`train.step.make_train_step`): mean next-token cross entropy over
`loss_mask`, which here is 1 exactly on assistant tokens (content and `<|im_end|>`); rows pack
several conversations with `segment_ids`, so attention never crosses conversations and the
batch loss is the token-weighted mean of the per-conversation losses. Data, batching and
resumable iteration: `train.chat_data`; loop, checkpoints, metrics: `train.runner`.
Evaluation (`eval_every`): the same masked loss (and perplexity) on the held-out conversations.

Qwen2's recipe (`configs/sft_qwen2-report.yaml`): 2 epochs, learning rate 7e-6 decaying to
7e-7 over the run, weight decay 0.1, gradient clipping 1.0, sequence length 32768.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from qwen2_jax.train import chat_data, posttrain, runner
from qwen2_jax.train.pretrain import NextTokenJob, NextTokenObjective


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(NextTokenObjective, posttrain.ChatRunSettings):
  job_name: ClassVar[str] = "sft"


class SFTJob(NextTokenJob, posttrain.ChatJob):
  config = SFTConfig
  name = "sft"
  dataset_class = chat_data.SFTDataset
  metric_names = ("tokens",)           # trained (assistant) tokens in the step's batch


def sft(cfg: SFTConfig) -> dict[str, Any]:
  """Runs (or resumes) SFT; returns the run summary."""
  return runner.run(SFTJob(cfg))
