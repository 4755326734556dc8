"""The training jobs' compile targets for the AOT planner (`qwen2_jax.aot`, `qwen2-jax compile`).

  train            forward, backward and optimizer update of `train.step` (AdamW: f32 mu and nu)
  sft              the same step with the SFT recipe's optimizer (Qwen2's 7e-6 -> 7e-7 AdamW)
  dpo              the DPO step (`train.dpo`) with the frozen reference's params on the mesh as a
                   second, undonated input; the batch counts preference pairs, 2 sequences each
  dpo_precomputed  the DPO step with the reference log-probs in the batch

`targets(optim)` builds them with a recipe's optimizer settings (`OptimConfig`, e.g. `mu_dtype`)
in place of those defaults; `TARGETS` are the defaults.
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


def _step_target(name: str, optimizer: optax.GradientTransformation) -> aot.Target:
  def lower(config, mesh, rules, batch_size: int, seq_len: int):
    return _lower_step(config, optimizer, mesh, rules, batch_size, seq_len)
  return aot.Target(name, lower, flops.train_flops_per_token)


def dpo_target(reference: str, optimizer: optax.GradientTransformation | None = None
               ) -> aot.Target:
  """The DPO step on `batch` preference pairs = 2 x batch sequences: policy forward + backward,
  and the frozen reference's forward with its params as a second, undonated input
  ("on_the_fly") or reference log-probs in the batch ("precomputed"). `optimizer`: default
  AdamW with f32 moments."""
  precomputed = reference == "precomputed"
  optimizer = optimizer or optax.adamw(1e-6)

  def lower(config, mesh, rules, batch_size, seq_len):
    state = train_lib.abstract_train_state(config, optimizer, mesh, rules)
    batch = dpo.abstract_batch(batch_size, seq_len, mesh, rules, precomputed=precomputed)
    step = dpo.make_dpo_step(config, optimizer, mesh, rules, beta=0.1, reference=reference)
    return step.lower(state, batch) if precomputed else step.lower(state, state.params, batch)

  factor = flops.dpo_flops_factor(precomputed)
  return aot.Target("dpo_precomputed" if precomputed else "dpo", lower,
                    lambda config, seq_len: factor * flops.train_flops_per_token(config, seq_len),
                    tokens_per_step=lambda batch, seq_len: 2 * batch * seq_len)


def targets(optim: OptimConfig | None = None) -> dict[str, aot.Target]:
  """Every training target by name; with `optim`, all of them use `make_optimizer(optim)`."""
  if optim is None:
    train_opt, sft_opt, dpo_opt = (optax.adamw(1e-4), make_optimizer(OptimConfig(
        learning_rate=7e-6, min_learning_rate=7e-7)), None)
  else:
    train_opt = sft_opt = dpo_opt = make_optimizer(optim)
  return {t.name: t for t in (
      _step_target("train", train_opt), _step_target("sft", sft_opt),
      dpo_target("on_the_fly", dpo_opt), dpo_target("precomputed", dpo_opt))}


TARGETS = targets()
