"""Pretraining (`qwen2-jax pretrain --config ...`): its recipe and its job on `train.runner`.

What pretraining adds to the shared run settings: packed documents from the grain pipeline
(`train.data`; the stream never ends, so `steps` is required), the next-token objective
(`train.step`, with `z_loss` and, for MoE models, `router_z_loss`), and evaluation on the
documents `data.eval_every_nth_document` holds out (mean loss and perplexity over up to
`eval_batches` batches). Mesh, checkpoints, resume, metrics and export: `train.runner`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, ClassVar

import jax

from qwen2_jax.train import data as data_lib, runner, step as step_lib
from qwen2_jax.typed_config import ConfigError, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class NextTokenObjective:
  """Settings of the next-token objective (pretraining and SFT); a base of their recipes."""
  z_loss: Float = 0.0                  # coefficient of mean(logsumexp^2) over trained tokens
  router_z_loss: Float = 0.0           # MoE: coefficient of the router z-loss (ST-MoE, Zoph
                                       # et al. 2022); Qwen2-MoE trains without it

  def __post_init__(self):
    super().__post_init__()
    for name in ("z_loss", "router_z_loss"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{type(self).__name__}.{name}: must be >= 0, got "
                          f"{getattr(self, name)}")
    if self.router_z_loss and not self.model.is_moe:
      raise ConfigError(f"{type(self).__name__}.router_z_loss: {self.router_z_loss} needs an MoE "
                        f"model (model.num_experts > 0)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig(NextTokenObjective, runner.RunSettings):
  job_name: ClassVar[str] = "pretrain"
  data: data_lib.DataConfig
  steps: Int                           # total optimizer steps of the run
  eval_batches: Int | None = 4


class NextTokenJob(runner.Job):
  """The steps of the next-token objective (`train.step`) for a `NextTokenObjective` recipe:
  what pretraining and SFT share."""

  def make_step(self, optimizer, mesh, rules):
    cfg = self.cfg
    return step_lib.make_train_step(cfg.model, optimizer, mesh, rules,
                                    accum_steps=cfg.accum_steps, z_loss=cfg.z_loss,
                                    router_z_loss=cfg.router_z_loss)

  def make_eval_step(self, mesh, rules):
    return step_lib.make_eval_step(self.cfg.model, mesh, rules)  # {loss_sum, tokens}


class PretrainJob(NextTokenJob):
  config = PretrainConfig
  name = "pretrain"
  held_out_setting = "data.eval_every_nth_document"

  def open_data(self, tokenizer) -> runner.Data:
    data = self.cfg.data
    build = lambda eval_split: data_lib.build_dataset(
        data, tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
        eval_split=eval_split)

    def held_out():
      # A short final batch would need its own compilation: stop before it.
      return itertools.takewhile(
          lambda b: b["input_ids"].shape[0] * jax.process_count() == data.batch_size, build(True))

    return runner.Data(iterator=data_lib.ResumableIterator(build(False)),
                       held_out=held_out if data.eval_every_nth_document else None)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
  """Runs (or resumes) pretraining; returns the run summary."""
  return runner.run(PretrainJob(cfg))
