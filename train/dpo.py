"""Offline DPO (Rafailov et al. 2023), as in Qwen2's post-training: loss, step, sharded jit.

A batch of B preference pairs is 2B rows (`train.chat_data.PreferenceDataset`): chosen response
of pair i in row 2i, rejected in row 2i + 1, each with `loss_mask` 1 on the response tokens
only. With pi = sum over response tokens of log p_policy(token) and ref the same under the
frozen reference model:

  margin  = (pi_c - ref_c) - (pi_r - ref_r)
  loss    = -(1 - ls) log sigmoid(beta margin) - ls log sigmoid(-beta margin)   (mean over pairs)
  rewards = beta (pi - ref)   (chosen / rejected); reward accuracy = mean[reward_c > reward_r]

`ls` is label smoothing (conservative DPO; 0 = plain sigmoid DPO). Reference log-probs come from
reference params held on the mesh next to the policy (`reference: on_the_fly`: one extra
forward per step, twice the param memory) or from the batch (`ref_logps` [2B, 1], computed once
before training by `precompute_reference` and kept in `output_dir/reference_logps.npy`:
`reference: precomputed`). Padding pairs (no response tokens) are excluded from every mean.
Evaluation (`eval_every`): the same loss and metrics (reward accuracy, margin, ...) over the
held-out pairs, no update (`make_dpo_eval_step`; precomputed: `reference_logps_eval.npy`).
The run (`qwen2-jax dpo --config ...`): `DPOConfig`, `DPOJob`, `dpo`, on `train.runner`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from qwen2_jax import flops, sharding
from qwen2_jax.config import Qwen2Config
from qwen2_jax.errors import UserError
from qwen2_jax.train import chat_data, online, posttrain, runner, step as step_lib
from qwen2_jax.train.step import Batch, TrainState
from qwen2_jax.typed_config import ConfigError, Float, Int

REFERENCE_MODES = ("on_the_fly", "precomputed")
DPO_BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
DPO_METRICS = ("loss", "reward_accuracy", "rewards_chosen", "rewards_rejected", "rewards_margin",
               "logps_chosen", "logps_rejected")


def sequence_logps(config: Qwen2Config, params: Any, batch: Batch) -> jax.Array:
  """[R] sum of log p(target) over each row's `loss_mask` tokens (f32 log-softmax)."""
  nll, _ = step_lib.token_losses(config, params, batch)  # [R, T]
  return -(nll * batch["loss_mask"].astype(jnp.float32)).sum(axis=-1)


def dpo_sums(policy_logps: jax.Array, ref_logps: jax.Array, valid: jax.Array, *, beta: float,
             label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """Sums over the valid pairs of the DPO loss and metrics (divide by `pairs` for means).

  Args:
    policy_logps, ref_logps: [2P] sequence log-probs, chosen at even and rejected at odd rows.
    valid: [P] bool, pairs that count (both responses have tokens).
  """
  pc, pr = policy_logps[0::2], policy_logps[1::2]  # [P]
  rc, rr = ref_logps[0::2], ref_logps[1::2]        # [P]
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)
  logits = chosen - rejected                       # beta * margin
  losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
            - label_smoothing * jax.nn.log_sigmoid(-logits))
  w = valid.astype(jnp.float32)
  values = (losses, (chosen > rejected).astype(jnp.float32), chosen, rejected, logits, pc, pr)
  sums = {name: (v * w).sum() for name, v in zip(DPO_METRICS, values)}
  return {**sums, "pairs": w.sum()}


def _pair_valid(batch: Batch) -> jax.Array:
  tokens = batch["loss_mask"].astype(jnp.float32).sum(axis=-1)  # [2P]
  return (tokens[0::2] > 0) & (tokens[1::2] > 0)                 # [P]


def dpo_objective(config: Qwen2Config, params: Any, batch: Batch, ref_params: Any | None, *,
                  beta: float, label_smoothing: float = 0.0
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(sum of pair losses, sums) of one (micro-)batch; the reference is `ref_params` when given,
  else `batch["ref_logps"]` [2P, 1]."""
  policy = sequence_logps(config, params, batch)
  if ref_params is not None:
    ref = jax.lax.stop_gradient(sequence_logps(config, ref_params, batch))
  else:
    ref = batch["ref_logps"][:, 0].astype(jnp.float32)
  sums = dpo_sums(policy, ref, _pair_valid(batch), beta=beta, label_smoothing=label_smoothing)
  return sums["loss"], sums


def _micro_pairs(batch: Batch, accum_steps: int) -> Batch:
  """[2P, ...] -> [A, 2P/A, ...], micro-batch a = pairs a, A + a, ... (each pair stays whole)."""
  def split(x):
    if x is None:
      return None
    P = x.shape[0] // 2
    x = x.reshape(P // accum_steps, accum_steps, 2, *x.shape[1:])  # [P/A, A, 2, ...]
    x = x.swapaxes(0, 1)                                             # [A, P/A, 2, ...]
    return x.reshape(accum_steps, 2 * (P // accum_steps), *x.shape[3:])  # [A, 2P/A, ...]
  return {k: split(v) for k, v in batch.items()}


def dpo_train_step(config: Qwen2Config, optimizer: optax.GradientTransformation,
                   state: TrainState, batch: Batch, ref_params: Any | None = None, *,
                   beta: float, label_smoothing: float = 0.0, accum_steps: int = 1
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the mean DPO loss over all valid pairs of the batch (over `accum_steps`
  micro-batches). A non-finite loss or gradient leaves params and optimizer state unchanged
  and counts a skipped step, as in `train.step.train_step`."""
  grad_fn = jax.value_and_grad(dpo_objective, argnums=1, has_aux=True)
  kwargs = dict(beta=beta, label_smoothing=label_smoothing)
  if accum_steps == 1:
    (_, sums), grads = grad_fn(config, state.params, batch, ref_params, **kwargs)
  else:
    def body(carry, micro):
      g_acc, s_acc = carry
      (_, s), g = grad_fn(config, state.params, micro, ref_params, **kwargs)
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sum_zeros = {k: jnp.zeros((), jnp.float32) for k in (*DPO_METRICS, "pairs")}
    (grads, sums), _ = jax.lax.scan(body, (zeros, sum_zeros), _micro_pairs(batch, accum_steps))
  pairs = jnp.maximum(sums["pairs"], 1.0)
  grads = jax.tree.map(lambda g: g / pairs, grads)
  metrics = {k: sums[k] / pairs for k in DPO_METRICS}
  new_state, grad_norm, finite = step_lib.apply_update_if_finite(optimizer, state, grads,
                                                                 metrics["loss"])
  return new_state, {**metrics, "grad_norm": grad_norm, "pairs": sums["pairs"],
                     "tokens": batch["loss_mask"].astype(jnp.float32).sum(), "finite": finite}


# ----------------------------------------------------------------------------------- sharded jit

def batch_shardings(mesh: Mesh, rules: sharding.Rules, *, precomputed: bool) -> dict[str, Any]:
  """Shardings of a DPO batch's arrays: rows over the batch axes; `ref_logps` [2P, 1]."""
  rows = sharding.batch_sharding(mesh, rules)
  out = {k: rows for k in DPO_BATCH_KEYS}
  if precomputed:
    out["ref_logps"] = sharding.batch_sharding(mesh, rules, (None, 1))
  return out


def abstract_batch(pairs: int, seq_len: int, mesh: Mesh, rules: sharding.Rules, *,
                   precomputed: bool) -> Batch:
  """A sharded `ShapeDtypeStruct` DPO batch of `pairs` pairs (2 * pairs rows of seq_len)."""
  batch = step_lib.abstract_batch(2 * pairs, seq_len, mesh, rules, packed=True)
  if precomputed:
    batch["ref_logps"] = jax.ShapeDtypeStruct(
        (2 * pairs, 1), jnp.float32, sharding=sharding.batch_sharding(mesh, rules, (2 * pairs, 1)))
  return batch


def make_dpo_step(config: Qwen2Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                  rules: sharding.Rules, *, beta: float, label_smoothing: float = 0.0,
                  accum_steps: int = 1, reference: str = "on_the_fly", donate: bool = True
                  ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """`dpo_train_step` jitted for `mesh`: `step(state, ref_params, batch)` (on_the_fly; the
  reference params are sharded like the policy's and never donated) or `step(state, batch)`
  (precomputed). `.lower(...)` works on abstract values for ahead-of-time compilation."""
  if reference not in REFERENCE_MODES:
    raise ValueError(f"reference: {reference!r} is not one of {REFERENCE_MODES}")
  sharding.check_mesh_uses_rules(mesh, rules)
  state_sh = step_lib.state_shardings(config, optimizer, mesh, rules)
  batch_sh = batch_shardings(mesh, rules, precomputed=reference == "precomputed")
  out_sh = (state_sh, sharding.replicated(mesh))
  kwargs = dict(beta=beta, label_smoothing=label_smoothing, accum_steps=accum_steps)

  if reference == "precomputed":
    def step(state, batch):
      with sharding.activation_rules(rules, mesh, config):
        return dpo_train_step(config, optimizer, state, batch, None, **kwargs)
    return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=out_sh,
                   donate_argnums=(0,) if donate else ())

  def step_with_ref(state, ref_params, batch):
    with sharding.activation_rules(rules, mesh, config):
      return dpo_train_step(config, optimizer, state, batch, ref_params, **kwargs)
  return jax.jit(step_with_ref, in_shardings=(state_sh, state_sh.params, batch_sh),
                 out_shardings=out_sh, donate_argnums=(0,) if donate else ())


def make_dpo_eval_step(config: Qwen2Config, mesh: Mesh, rules: sharding.Rules, *, beta: float,
                       label_smoothing: float = 0.0, reference: str = "on_the_fly"
                       ) -> Callable[..., dict[str, jax.Array]]:
  """Jitted held-out evaluation, no update: `(params, ref_params, batch)` (on_the_fly) or
  `(params, batch)` (precomputed) -> the batch's `dpo_sums`, replicated."""
  params_sh = sharding.param_shardings(config, mesh, rules)
  batch_sh = batch_shardings(mesh, rules, precomputed=reference == "precomputed")
  out_sh = sharding.replicated(mesh)

  def sums(params, ref_params, batch):
    with sharding.activation_rules(rules, mesh, config):
      return dpo_objective(config, params, batch, ref_params, beta=beta,
                           label_smoothing=label_smoothing)[1]

  if reference == "precomputed":
    return jax.jit(lambda params, batch: sums(params, None, batch),
                   in_shardings=(params_sh, batch_sh), out_shardings=out_sh)
  return jax.jit(sums, in_shardings=(params_sh, params_sh, batch_sh), out_shardings=out_sh)


def make_logps_fn(config: Qwen2Config, mesh: Mesh, rules: sharding.Rules
                  ) -> Callable[[Any, Batch], jax.Array]:
  """Jitted (params, batch) -> [R] response log-probs, replicated (for the precompute pass)."""
  params_sh = sharding.param_shardings(config, mesh, rules)
  batch_sh = batch_shardings(mesh, rules, precomputed=False)

  def logps(params, batch):
    with sharding.activation_rules(rules, mesh, config):
      return sequence_logps(config, params, batch)

  return jax.jit(logps, in_shardings=(params_sh, batch_sh),
                 out_shardings=sharding.replicated(mesh))


# ----------------------------------------------------------------------------------- the run

REFERENCE_FILE = "reference_logps.npy"
EVAL_REFERENCE_FILE = "reference_logps_eval.npy"  # the held-out pairs', when there are some


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineDPOSettings:
  """Online DPO (the Qwen2 report's second RLHF stage): each round samples
  `rollout.num_generations` responses per prompt from the current policy, scores them with
  `rewards` (usually the reward model), and the best and worst become the chosen and rejected
  response of a pair; a prompt whose responses all score the same gives no pair. Then
  `num_iterations` DPO updates on the round's pairs."""
  rollout: online.RolloutConfig = dataclasses.field(
      default_factory=lambda: online.RolloutConfig(num_generations=4))
  rewards: tuple[online.RewardTerm, ...] = ()
  num_iterations: Int = 1              # DPO updates per round on its pairs

  def __post_init__(self):
    online.check_rewards(self.rewards, "DPOConfig.online")
    if self.rollout.num_generations < 2:
      raise ConfigError(f"DPOConfig.online.rollout.num_generations: must be >= 2 (a best and "
                        f"a worst response), got {self.rollout.num_generations}")
    if self.num_iterations <= 0:
      raise ConfigError(f"DPOConfig.online.num_iterations: must be positive, got "
                        f"{self.num_iterations}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(posttrain.ChatRunSettings):
  job_name: ClassVar[str] = "dpo"
  path_fields: ClassVar[tuple[str, ...]] = (*runner.RunSettings.path_fields, "reference_from")

  beta: Float = 0.1                    # KL strength of the implicit reward
  label_smoothing: Float = 0.0         # 0: sigmoid DPO; > 0: conservative DPO (label noise)
  reference: str = "on_the_fly"        # "on_the_fly" (reference params on the mesh) or
                                       # "precomputed" (one pass before training; see README)
  reference_from: str | None = None    # reference weights; default: the initial policy
  online: OnlineDPOSettings | None = None  # online DPO: pairs sampled and scored each round
                                       # (`train.online_dpo`); data are then prompts

  def __post_init__(self):
    super().__post_init__()
    if self.online is not None:
      if self.reference != "on_the_fly":
        raise ConfigError("DPOConfig.reference: online DPO needs on_the_fly (the pairs are "
                          "new every round)")
      online.check_rollout_fits(self.online.rollout, self.data.seq_len, "DPOConfig.online")
    if not self.beta > 0:
      raise ConfigError(f"DPOConfig.beta: must be > 0, got {self.beta}")
    if not 0 <= self.label_smoothing < 0.5:
      raise ConfigError(f"DPOConfig.label_smoothing: must be in [0, 0.5), got "
                        f"{self.label_smoothing}")
    if self.reference not in REFERENCE_MODES:
      raise ConfigError(f"DPOConfig.reference: {self.reference!r} is not one of "
                        f"{REFERENCE_MODES}")


  @property
  def updates_per_round(self) -> int:
    return 1 if self.online is None else self.online.num_iterations

  def run_optim(self, steps: int):
    return super().run_optim(steps * self.updates_per_round)


def _local_value(x: jax.Array) -> np.ndarray:
  """A replicated array's value on this process (also across processes)."""
  return np.asarray(x.addressable_shards[0].data)


class DPOJob(posttrain.ChatJob):
  config = DPOConfig
  name = "dpo"
  dataset_class = chat_data.PreferenceDataset
  rows_per_example = 2
  metric_names = DPO_METRICS[1:] + ("pairs",)

  @classmethod
  def for_config(cls, cfg: DPOConfig) -> runner.Job:
    """The job of a DPO recipe: online DPO (`train.online_dpo`) when it has `online:`."""
    if cfg.online is not None:
      from qwen2_jax.train import online_dpo  # pylint: disable=import-outside-toplevel
      return online_dpo.OnlineDPOJob(cfg)
    return cls(cfg)

  def __init__(self, cfg: DPOConfig):
    super().__init__(cfg)
    self.precomputed = cfg.reference == "precomputed"
    self.ref_params = None
    self.ref_table = None       # [pairs, 2] f32 (chosen, rejected)
    self.eval_ref_table = None  # the same for the held-out pairs

  def flops_per_token(self) -> float:
    return flops.dpo_flops_factor(self.precomputed) * super().flops_per_token()

  def _reference_params(self, mesh, rules, initial_params):
    if self.cfg.reference_from is not None:
      return runner.load_params(self.cfg.model, self.cfg.reference_from, mesh, rules,
                                progress=self.cfg.progress)
    return initial_params()

  def prepare(self, mesh, rules, initial_params, resumed):
    if not self.precomputed:
      ref = self._reference_params(mesh, rules, initial_params)
      if not resumed and self.cfg.reference_from is None:
        # The initial policy is the fresh train state's params, which the first step donates.
        shardings = sharding.param_shardings(self.cfg.model, mesh, rules)
        ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(ref)
      self.ref_params = ref
      return
    sets = {REFERENCE_FILE: self.dataset}
    if self.dataset.held_out is not None:
      sets[EVAL_REFERENCE_FILE] = self.dataset.held_out
    paths = {name: os.path.join(self.cfg.output_dir, name) for name in sets}
    if resumed and all(os.path.isfile(p) for p in paths.values()):
      tables = {name: np.load(p) for name, p in paths.items()}
      for name, ds in sets.items():
        if tables[name].shape != (len(ds.examples), 2):
          raise UserError(f"{paths[name]} holds {tables[name].shape[0]} pairs, the data "
                          f"{len(ds.examples)}: remove it to compute it again")
    else:
      ref = self._reference_params(mesh, rules, initial_params)
      tables = {name: precompute_reference(self.cfg.model, ref, ds, mesh, rules,
                                           progress=self.cfg.progress)
                for name, ds in sets.items()}
      if jax.process_index() == 0:
        for name, path in paths.items():
          with open(path + ".tmp", "wb") as f:
            np.save(f, tables[name])
          os.replace(path + ".tmp", path)
    self.ref_table, self.eval_ref_table = tables[REFERENCE_FILE], tables.get(EVAL_REFERENCE_FILE)

  def make_step(self, optimizer, mesh, rules):
    step = make_dpo_step(self.cfg.model, optimizer, mesh, rules, beta=self.cfg.beta,
                         label_smoothing=self.cfg.label_smoothing,
                         accum_steps=self.cfg.accum_steps, reference=self.cfg.reference)
    if self.precomputed:
      return step
    return lambda state, batch: step(state, self.ref_params, batch)

  def make_eval_step(self, mesh, rules):
    step = make_dpo_eval_step(self.cfg.model, mesh, rules, beta=self.cfg.beta,
                              label_smoothing=self.cfg.label_smoothing,
                              reference=self.cfg.reference)
    if self.precomputed:
      return step
    return lambda params, batch: step(params, self.ref_params, batch)

  def eval_result(self, sums):
    pairs = sums.get("pairs", 0.0)
    return {**{f"eval/{k}": sums.get(k, 0.0) / max(pairs, 1.0) for k in DPO_METRICS},
            "eval/pairs": pairs}

  def host_batch(self, batch, held_out=False):
    index = batch.pop("example_index")[:, 0]           # [R], -1 for padding rows
    if self.precomputed:
      table = self.eval_ref_table if held_out else self.ref_table
      side = np.arange(len(index)) % 2                 # chosen rows even, rejected odd
      ref = table[np.maximum(index, 0), side]
      batch["ref_logps"] = np.where(index >= 0, ref, 0.0).astype(np.float32)[:, None]  # [R, 1]
    return batch


def precompute_reference(config: Qwen2Config, params: Any, dataset: chat_data.PreferenceDataset,
                         mesh: Mesh, rules: sharding.Rules, *, progress: bool = True
                         ) -> np.ndarray:
  """[pairs, 2] reference log-probs (chosen, rejected) of every pair: one forward pass over the
  data in file order, in batches of `data.batch_size` pairs."""
  logps_fn = make_logps_fn(config, mesh, rules)
  rows = dataset.ordered_rows()
  per_batch = 2 * dataset.config.batch_size
  table = np.zeros((len(dataset.examples), 2), np.float32)
  bar = tqdm(total=len(dataset.examples), unit="pair", desc="reference log-probs",
             disable=not (progress and jax.process_index() == 0))
  for start in range(0, len(rows), per_batch):
    chunk = rows[start:start + per_batch]
    host = dataset.rows_batch(chunk, jax.process_index(), jax.process_count())
    host.pop("example_index")
    values = _local_value(logps_fn(params, sharding.host_local_batch(host, mesh, rules)))
    for (i, side), v in zip(chunk, values):
      table[i, side] = v
    bar.update(len(chunk) // 2)
  bar.close()
  return table


def dpo(cfg: DPOConfig) -> dict[str, Any]:
  """Runs (or resumes) offline DPO, or online DPO when `cfg.online` is set; returns the run
  summary."""
  return runner.run(DPOJob.for_config(cfg))
