"""Supervised fine-tuning on chat data (`qwen2-jax sft --config ...`), as in the Qwen2 report.

The step is pretraining's (`train.step.make_train_step`): mean next-token cross entropy over
`loss_mask`, which here is 1 exactly on assistant tokens (content and `<|im_end|>`); rows pack
several conversations with `segment_ids`, so attention never crosses conversations and the
batch loss is the token-weighted mean of the per-conversation losses. Data, batching and
resumable iteration: `train.chat_data`; loop, checkpoints, metrics: `train.posttrain`.
Evaluation (`eval_every`): the same masked loss (and perplexity) on the held-out conversations.

Qwen2's recipe (`configs/sft_qwen2-report.yaml`): 2 epochs, learning rate 7e-6 decaying to
7e-7 over the run, weight decay 0.1, gradient clipping 1.0, sequence length 32768.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from qwen2_jax.train import chat_data, loop, posttrain, step as step_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(posttrain.PostTrainConfig):
  z_loss: float = 0.0                  # coefficient of mean(logsumexp^2) over trained tokens

  def job_fingerprint(self) -> dict[str, Any]:
    return {"job": "sft", "z_loss": self.z_loss}


class SFTJob(posttrain.Job):
  name = "sft"
  metric_names = ("tokens",)           # trained (assistant) tokens in the step's batch

  def build_dataset(self, tokenizer):
    return chat_data.SFTDataset(self.cfg.data, tokenizer)

  def make_step(self, optimizer, mesh, rules):
    return step_lib.make_train_step(self.cfg.model, optimizer, mesh, rules,
                                    accum_steps=self.cfg.accum_steps, z_loss=self.cfg.z_loss)

  def make_eval_step(self, mesh, rules):
    return step_lib.make_eval_step(self.cfg.model, mesh, rules)  # {loss_sum, tokens}

  def eval_result(self, sums):
    return loop.lm_eval_result(sums)  # assistant-token loss, perplexity, tokens


config_from_dict = functools.partial(posttrain.config_from_dict, SFTConfig)
load_config = functools.partial(posttrain.load_config, SFTConfig)


def sft(cfg: SFTConfig) -> dict[str, Any]:
  """Runs (or resumes) SFT; returns the run summary."""
  return posttrain.run(SFTJob(cfg))
