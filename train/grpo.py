"""GRPO (Shao et al. 2024, DeepSeekMath; the online RL stage of Qwen2.5): objective, update, run.

A round (`train.online`): P prompts, G responses each sampled by the engine from the current
policy, rewards r. Advantages are normalised within each prompt's group:

  A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)   (`scale_rewards: group`, std with ddof 0)
  A_i =  r_i - mean_group(r)                             (`scale_rewards: none`)

and every token t of response i gets A_i. With the policy's log-probability logp_t, the
rollout's old_t (the engine's, of the same tokens), rho_t = exp(logp_t - old_t), and the frozen
reference's ref_t:

  l_t = -min(rho_t A_i, clip(rho_t, 1 - clip_epsilon, 1 + clip_epsilon_high) A_i)
        + kl_coef * KL_t
  KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1    (kl_estimator k3, Schulman's unbiased
         estimator, as in the GRPO paper); k1: logp_t - ref_t; k2: (logp_t - ref_t)^2 / 2

  loss = sum_t l_t / sum_i |o_i|                      (`loss_aggregation: token`, over the
                                                        mini-batch's response tokens)
  loss = mean_i (sum_{t in o_i} l_t / |o_i|)           (`loss_aggregation: sequence`, the
                                                        paper's per-response mean)

kl_coef 0 turns the penalty off and no reference is kept. Each round's rows are split into
`num_minibatches` mini-batches, one optimizer update each, and the rollout batch is used
`num_iterations` times, so a round takes num_iterations x num_minibatches updates (the old
log-probs stay the rollout's: the clipping bounds how far the later updates move); a
mini-batch of padding only (an epoch's last round may hold fewer prompts) is not an update at
all, and a partly filled one is normalised over its own responses. One run
step is one round: `steps`, `checkpoint_every`, `log_every` count rounds; the learning-rate
schedule counts updates (with `auto_decay` it decays over steps x updates per round).

The run (`qwen2-jax grpo --config ...`): `GRPOConfig`, `GRPOJob`, `grpo`, on `train.runner`.
Logged per round: loss, grad_norm (means over the round's updates), kl (per token), clip_fraction
(tokens where the clipped term was the smaller, so its gradient is zero), ratio, the rollout's
reward mean / std (and per reward term), response length, truncated share, reward failures,
rollout and training tokens/s and the share of the round spent generating.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from qwen2_jax import flops, sharding
from qwen2_jax.config import Qwen2Config
from qwen2_jax.train import online, runner, step as step_lib
from qwen2_jax.train.step import Batch, TrainState
from qwen2_jax.typed_config import ConfigError, Float, Int

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token", "sequence")
SCALE_REWARDS = ("group", "none")
ROW_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "old_logps",
            "weights")
GRPO_SUMS = ("loss", "pg_loss", "kl", "clip_fraction", "ratio", "tokens")
ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = "group") -> np.ndarray:
  """[P * G] rewards (prompt-major) -> [P * G] f32 advantages (module docstring)."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centred = r - r.mean(axis=1, keepdims=True)
  if scale == "group":
    centred = centred / (r.std(axis=1, keepdims=True) + ADVANTAGE_EPS)
  return centred.reshape(-1).astype(np.float32)


def token_weights(loss_mask: np.ndarray, aggregation: str) -> np.ndarray:
  """[R, T] weights of each response token in a mini-batch's loss (module docstring): they
  sum to 1 over the mini-batch (0 when it has no response token)."""
  mask = np.asarray(loss_mask, np.float32)
  if aggregation == "token":
    return mask / max(mask.sum(), 1.0)
  lengths = mask.sum(axis=1, keepdims=True)               # [R, 1]
  rows = max(float((lengths > 0).sum()), 1.0)
  return mask / np.maximum(lengths, 1.0) / rows


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens."""
  d = ref_logp - logp
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * d * d
  if estimator == "k3":
    return jnp.exp(d) - d - 1.0
  raise ValueError(f"kl_estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def token_logps(config: Qwen2Config, params: Any, batch: Batch) -> jax.Array:
  """[R, T] f32 log-probability of each target under `params`."""
  nll, _ = step_lib.token_losses(config, params, batch)
  return -nll


def grpo_objective(config: Qwen2Config, params: Any, batch: Batch, *, clip_epsilon: float,
                   clip_epsilon_high: float, kl_coef: float, kl_estimator: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, sums) of one (micro-)batch: loss = sum_t weights_t l_t (module docstring); sums of
  pg_loss (weighted like the loss) and of kl, clip_fraction, ratio, tokens over the response
  tokens. MoE models add router_aux_loss_coef x the load-balancing loss, weighted by the
  micro-batch's share of the weights."""
  nll, _, aux = step_lib._forward_losses(config, params, batch)  # pylint: disable=W0212
  logp = -nll                                                   # [R, T]
  mask = batch["loss_mask"].astype(jnp.float32)
  w = batch["weights"].astype(jnp.float32)
  adv = batch["advantages"].astype(jnp.float32)                 # [R, 1]
  live = mask > 0  # prompt and padding positions: no exp of arbitrary gaps (inf x 0 = NaN)
  ratio = jnp.exp(jnp.where(live, logp - batch["old_logps"], 0.0))
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon_high) * adv
  pg = -jnp.minimum(unclipped, clipped)
  if kl_coef:
    kl = kl_penalty(logp, jnp.where(live, batch["ref_logps"], logp), kl_estimator)
  else:
    kl = jnp.zeros_like(logp)
  per_token = pg + kl_coef * kl
  loss = (per_token * w).sum()
  moe_objective, _ = step_lib._moe_terms(config, aux, 0.0)  # pylint: disable=W0212
  loss = loss + moe_objective * w.sum()
  sums = {"loss": loss, "pg_loss": (pg * w).sum(), "kl": (kl * mask).sum(),
          "clip_fraction": ((clipped < unclipped) * mask).sum(), "ratio": (ratio * mask).sum(),
          "tokens": mask.sum()}
  return loss, sums


def grpo_train_step(config: Qwen2Config, optimizer: optax.GradientTransformation,
                    state: TrainState, batch: Batch, *, accum_steps: int = 1, **objective
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on a mini-batch (its weights sum to 1, so micro-batch gradients add up to the
  mini-batch's). A non-finite loss or gradient skips the update (`train.step`)."""
  grad_fn = jax.value_and_grad(grpo_objective, argnums=1, has_aux=True)
  if accum_steps == 1:
    (_, sums), grads = grad_fn(config, state.params, batch, **objective)
  else:
    def body(carry, micro):
      g_acc, s_acc = carry
      (_, s), g = grad_fn(config, state.params, micro, **objective)
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sum_zeros = {k: jnp.zeros((), jnp.float32) for k in GRPO_SUMS}
    (grads, sums), _ = jax.lax.scan(body, (zeros, sum_zeros),
                                    step_lib._micro_batches(batch, accum_steps))  # pylint: disable=W0212
  tokens = jnp.maximum(sums["tokens"], 1.0)
  metrics = {"loss": sums["loss"], "pg_loss": sums["pg_loss"], "kl": sums["kl"] / tokens,
             "clip_fraction": sums["clip_fraction"] / tokens, "ratio": sums["ratio"] / tokens,
             "tokens": sums["tokens"]}
  new_state, grad_norm, finite = step_lib.apply_update_if_finite(optimizer, state, grads,
                                                                 metrics["loss"])
  return new_state, {**metrics, "grad_norm": grad_norm, "finite": finite}


# ----------------------------------------------------------------------------------- sharded jit

def batch_shardings(mesh: Mesh, rules: sharding.Rules, *, with_ref: bool) -> dict[str, Any]:
  rows = sharding.batch_sharding(mesh, rules)
  out = {k: rows for k in ROW_KEYS}
  out["advantages"] = sharding.batch_sharding(mesh, rules, (None, 1))
  if with_ref:
    out["ref_logps"] = rows
  return out


def make_grpo_update(config: Qwen2Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                     rules: sharding.Rules, *, accum_steps: int = 1, donate: bool = True,
                     **objective) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`grpo_train_step` jitted for `mesh`: (state, mini-batch) -> (state, metrics)."""
  sharding.check_mesh_uses_rules(mesh, rules)
  state_sh = step_lib.state_shardings(config, optimizer, mesh, rules)
  batch_sh = batch_shardings(mesh, rules, with_ref=bool(objective.get("kl_coef")))

  def step(state, batch):
    with sharding.activation_rules(rules, mesh, config):
      return grpo_train_step(config, optimizer, state, batch, accum_steps=accum_steps,
                             **objective)
  return jax.jit(step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,) if donate else ())


def make_token_logps_fn(config: Qwen2Config, mesh: Mesh, rules: sharding.Rules
                        ) -> Callable[[Any, Batch], jax.Array]:
  """Jitted (params, rows) -> [R, T] per-target log-probs, batch-sharded."""
  params_sh = sharding.param_shardings(config, mesh, rules)
  rows = sharding.batch_sharding(mesh, rules)
  keys = ("input_ids", "targets", "positions", "segment_ids")

  def logps(params, batch):
    with sharding.activation_rules(rules, mesh, config):
      return token_logps(config, params, batch)

  jitted = jax.jit(logps, in_shardings=(params_sh, {k: rows for k in keys}), out_shardings=rows)
  return lambda params, batch: jitted(params, {k: batch[k] for k in keys})


# ----------------------------------------------------------------------------------- the run

@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(online.OnlineSettings):
  job_name: ClassVar[str] = "grpo"

  clip_epsilon: Float = 0.2           # lower clip: rho >= 1 - clip_epsilon
  clip_epsilon_high: Float | None = None  # upper clip (DAPO's clip-higher); None: clip_epsilon
  kl_coef: Float = 0.04               # 0: no KL penalty and no reference model
  kl_estimator: str = "k3"            # k1 | k2 | k3 (module docstring)
  loss_aggregation: str = "sequence"  # sequence (mean per response, then over responses) | token
  scale_rewards: str = "group"        # group: divide by the group's std | none
  num_iterations: Int = 1             # passes over each rollout batch
  num_minibatches: Int = 1            # optimizer updates per pass

  def __post_init__(self):
    super().__post_init__()
    bad = lambda name, rule: ConfigError(f"GRPOConfig.{name}: {rule}, got "
                                         f"{getattr(self, name)!r}")
    if not 0 < self.clip_epsilon < 1:
      raise bad("clip_epsilon", "must be in (0, 1)")
    if self.clip_epsilon_high is not None and not self.clip_epsilon_high > 0:
      raise bad("clip_epsilon_high", "must be > 0 or null")
    if not self.kl_coef >= 0:
      raise bad("kl_coef", "must be >= 0")
    for name, allowed in (("kl_estimator", KL_ESTIMATORS),
                          ("loss_aggregation", LOSS_AGGREGATIONS),
                          ("scale_rewards", SCALE_REWARDS)):
      if getattr(self, name) not in allowed:
        raise bad(name, f"must be one of {allowed}")
    if self.num_iterations <= 0:
      raise bad("num_iterations", "must be positive")
    if self.rollout.num_generations < 2:
      raise ConfigError(f"GRPOConfig.rollout.num_generations: must be >= 2 (advantages are "
                        f"relative to the group), got {self.rollout.num_generations}")
    rows = self.data.batch_size * self.rollout.num_generations
    if self.num_minibatches <= 0 or rows % self.num_minibatches:
      raise bad("num_minibatches", f"must divide the round's {rows} rows (data.batch_size x "
                                   f"rollout.num_generations)")
    if (rows // self.num_minibatches) % self.accum_steps:
      raise ConfigError(f"GRPOConfig.accum_steps: {self.accum_steps} must divide the "
                        f"{rows // self.num_minibatches} rows of a mini-batch")

  @property
  def updates_per_round(self) -> int:
    return self.num_iterations * self.num_minibatches


class GRPOJob(online.OnlineJob):
  config = GRPOConfig
  name = "grpo"

  def __init__(self, cfg: GRPOConfig):
    super().__init__(cfg)
    self.rows_per_example = cfg.rollout.num_generations
    self.updates_per_step = cfg.updates_per_round
    self.metric_names = ("pg_loss", "kl", "clip_fraction", "ratio",
                         *self.rollout_metric_names(), "train_tokens_per_s",
                         "generation_share")
    self.ref_params = None

  def flops_per_token(self) -> float:
    train = flops.train_flops_per_token(self.cfg.model, self.cfg.data.seq_len)
    return train * self.cfg.num_iterations * (4.0 / 3.0 if self.cfg.kl_coef else 1.0)

  def prepare(self, mesh, rules, initial_params, resumed):
    cfg = self.cfg
    rows = cfg.data.batch_size * cfg.rollout.num_generations // cfg.num_minibatches
    shards = sharding.num_batch_shards(mesh, rules)
    if (rows // cfg.accum_steps) % shards:
      raise ConfigError(f"num_minibatches: a mini-batch of {rows} rows (/ accum_steps="
                        f"{cfg.accum_steps}) does not split over the mesh's {shards} batch "
                        f"shards")
    if cfg.kl_coef:
      self.ref_params = self.reference_params(mesh, rules, initial_params, resumed)
    self.start_rollouts(mesh, rules)

  def make_step(self, optimizer, mesh, rules):
    cfg = self.cfg
    objective = dict(clip_epsilon=cfg.clip_epsilon,
                     clip_epsilon_high=(cfg.clip_epsilon if cfg.clip_epsilon_high is None
                                        else cfg.clip_epsilon_high),
                     kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    update = make_grpo_update(cfg.model, optimizer, mesh, rules, accum_steps=cfg.accum_steps,
                              **objective)
    ref_logps = make_token_logps_fn(cfg.model, mesh, rules) if cfg.kl_coef else None
    G = cfg.rollout.num_generations
    R = cfg.data.batch_size * G
    place = lambda b: sharding.host_local_batch(b, mesh, rules)

    def step(state, batch):
      t0 = time.perf_counter()
      round_index = int(state.step)
      ro = self.rollout(state.params, batch["example_index"][:, 0], round_index)
      rows = online.pad_rows(online.rows_of(ro.prompt_ids, ro.output_ids, ro.logprobs,
                                     cfg.data.seq_len, G), R)
      adv = np.zeros((R, 1), np.float32)
      adv[:len(ro.rewards), 0] = group_advantages(ro.rewards, G, cfg.scale_rewards)
      rows["advantages"] = adv
      if ref_logps is not None:
        rows["ref_logps"] = online.host_value(ref_logps(self.ref_params, place(rows)))
      t1 = time.perf_counter()
      outs = []
      n = R // cfg.num_minibatches
      for _ in range(cfg.num_iterations):
        for m in range(cfg.num_minibatches):
          mb = {k: v[m * n:(m + 1) * n] for k, v in rows.items()}
          if not mb["loss_mask"].any():
            continue  # only padding (an epoch's last round): no update at all
          mb["weights"] = token_weights(mb["loss_mask"], cfg.loss_aggregation)
          state, out = update(state, place(mb))
          outs.append(out)
      outs = [step_lib.metrics_to_host(o) for o in outs] or [online.NO_UPDATE]
      state = state._replace(step=jax.device_put(jnp.int32(round_index + 1),
                                                 state.step.sharding))
      t2 = time.perf_counter()
      mean = lambda k: float(np.mean([o[k] for o in outs]))
      trained = float(rows["loss_mask"].sum()) * cfg.num_iterations
      metrics = {k: mean(k) for k in ("loss", "grad_norm", "pg_loss", "kl", "clip_fraction",
                                      "ratio")}
      metrics["finite"] = float(all(o["finite"] for o in outs))
      metrics.update(self.rollout_metrics(ro))
      metrics["train_tokens_per_s"] = trained / max(t2 - t1, 1e-9)
      metrics["generation_share"] = ro.seconds / max(t2 - t0, 1e-9)
      return state, metrics

    return step




def grpo(cfg: GRPOConfig) -> dict[str, Any]:
  """Runs (or resumes) GRPO; returns the run summary."""
  return runner.run(GRPOJob(cfg))

