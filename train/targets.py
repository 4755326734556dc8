"""The training jobs' compile targets for the AOT planner (`qwen2_jax.aot`, `qwen2-jax compile`).

  train            forward, backward and optimizer update of `train.step` (AdamW: f32 mu and nu)
  sft              the same step with the SFT recipe's optimizer (Qwen2's 7e-6 -> 7e-7 AdamW)
  dpo              the DPO step (`train.dpo`) with the frozen reference's params on the mesh as a
                   second, undonated input; the batch counts preference pairs, 2 sequences each
  dpo_precomputed  the DPO step with the reference log-probs in the batch
"""

from __future__ import annotations

import optax

from qwen2_jax import aot, flops
from qwen2_jax.train import dpo, step as train_lib
from qwen2_jax.train.optim import OptimConfig, make_optimizer


def _lower_step(config, optimizer, mesh, rules, batch_size: int, seq_len: int):
  state = train_lib.abstract_train_state(config, optimizer, mesh, rules)
  batch = train_lib.abstract_batch(batch_size, seq_len, mesh, rules)
  return train_lib.make_train_step(config, optimizer, mesh, rules).lower(state, batch)


def _lower_train(config, mesh, rules, batch_size: int, seq_len: int):
  return _lower_step(config, optax.adamw(1e-4), mesh, rules, batch_size, seq_len)


def _lower_sft(config, mesh, rules, batch_size: int, seq_len: int):
  """SFT is the pretraining step on assistant-token masks, with the SFT recipe's AdamW."""
  optimizer = make_optimizer(OptimConfig(learning_rate=7e-6, min_learning_rate=7e-7))
  return _lower_step(config, optimizer, mesh, rules, batch_size, seq_len)


def dpo_target(reference: str) -> aot.Target:
  """The DPO step on `batch` preference pairs = 2 x batch sequences: policy forward + backward,
  and the frozen reference's forward with its params as a second, undonated input
  ("on_the_fly") or reference log-probs in the batch ("precomputed")."""
  precomputed = reference == "precomputed"

  def lower(config, mesh, rules, batch_size, seq_len):
    optimizer = optax.adamw(1e-6)
    state = train_lib.abstract_train_state(config, optimizer, mesh, rules)
    batch = dpo.abstract_batch(batch_size, seq_len, mesh, rules, precomputed=precomputed)
    step = dpo.make_dpo_step(config, optimizer, mesh, rules, beta=0.1, reference=reference)
    return step.lower(state, batch) if precomputed else step.lower(state, state.params, batch)

  factor = flops.dpo_flops_factor(precomputed)
  return aot.Target("dpo_precomputed" if precomputed else "dpo", lower,
                    lambda config, seq_len: factor * flops.train_flops_per_token(config, seq_len),
                    tokens_per_step=lambda batch, seq_len: 2 * batch * seq_len)


TARGETS = {t.name: t for t in (
    aot.Target("train", _lower_train, flops.train_flops_per_token),
    aot.Target("sft", _lower_sft, flops.train_flops_per_token),
    dpo_target("on_the_fly"), dpo_target("precomputed"))}
