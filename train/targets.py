"""The training jobs' compile targets for the AOT planner (`qwen2_jax.aot`, `qwen2-jax compile`).

  train            forward, backward and optimizer update of `train.step` (AdamW: f32 mu and nu)
  sft              the same step with the SFT recipe's optimizer (Qwen2's 7e-6 -> 7e-7 AdamW)
  dpo              the DPO step (`train.dpo`) with the frozen reference's params on the mesh as a
                   second, undonated input; the batch counts preference pairs, 2 sequences each
  dpo_precomputed  the DPO step with the reference log-probs in the batch
  grpo             a GRPO update (`train.grpo`) on a mini-batch of `batch` responses, with what
                   stays resident beside it during a run as undonated inputs: the frozen
                   reference's params and the rollout engine's KV-cache pools (one sequence of
                   seq_len tokens per response, pages of 16, sharded as the engine shards them;
                   a run's engine holds rollout.max_num_seqs sequences: equal to the figure
                   when that is the mini-batch's rows)

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


def grpo_target(optimizer: optax.GradientTransformation | None = None, *,
                page_size: int = 16) -> aot.Target:
  """The GRPO update with the reference params and the engine's KV pools resident (module
  docstring). The rollout programs are not compiled here: their temporaries are a step's T
  tokens, small beside the update's."""
  # pylint: disable=import-outside-toplevel  (the engine is only needed for this target)
  import jax
  import jax.numpy as jnp
  from qwen2_jax import sharding
  from qwen2_jax.infer.engine import pool_shape, pool_sharding
  from qwen2_jax.infer.paged import pages_for
  from qwen2_jax.layers import dtype_of
  from qwen2_jax.train import grpo
  optimizer = optimizer or optax.adamw(1e-6)

  def lower(config, mesh, rules, batch_size, seq_len):
    state = train_lib.abstract_train_state(config, optimizer, mesh, rules)
    rows = sharding.batch_sharding(mesh, rules, (batch_size, seq_len))
    spec = lambda dtype: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=rows)
    batch = {k: spec(jnp.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    batch.update({k: spec(jnp.float32) for k in ("loss_mask", "old_logps", "weights",
                                                 "ref_logps")})
    batch["advantages"] = jax.ShapeDtypeStruct(
        (batch_size, 1), jnp.float32,
        sharding=sharding.batch_sharding(mesh, rules, (batch_size, 1)))
    shape = pool_shape(config, batch_size * pages_for(seq_len + 1, page_size), page_size)
    pool = jax.ShapeDtypeStruct(shape, dtype_of(config.dtype),
                                sharding=pool_sharding(mesh, rules, shape))
    objective = dict(clip_epsilon=0.2, clip_epsilon_high=0.2, kl_coef=0.04, kl_estimator="k3")
    state_sh = train_lib.state_shardings(config, optimizer, mesh, rules)
    batch_sh = grpo.batch_shardings(mesh, rules, with_ref=True)

    def step(state, ref_params, k_pool, v_pool, batch):
      del ref_params, k_pool, v_pool  # resident during the run; not read by the update
      with sharding.activation_rules(rules, mesh, config):
        return grpo.grpo_train_step(config, optimizer, state, batch, **objective)

    jitted = jax.jit(step, in_shardings=(state_sh, state_sh.params, pool.sharding, pool.sharding,
                                         batch_sh),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                     keep_unused=True)
    return jitted.lower(state, state.params, pool, pool, batch)

  return aot.Target("grpo", lower, flops.train_flops_per_token)


def targets(optim: OptimConfig | None = None) -> dict[str, aot.Target]:
  """Every training target by name; with `optim`, all of them use `make_optimizer(optim)`."""
  if optim is None:
    train_opt, sft_opt, dpo_opt = (optax.adamw(1e-4), make_optimizer(OptimConfig(
        learning_rate=7e-6, min_learning_rate=7e-7)), None)
  else:
    train_opt = sft_opt = dpo_opt = make_optimizer(optim)
  return {t.name: t for t in (
      _step_target("train", train_opt), _step_target("sft", sft_opt),
      dpo_target("on_the_fly", dpo_opt), dpo_target("precomputed", dpo_opt),
      grpo_target(dpo_opt))}


TARGETS = targets()
